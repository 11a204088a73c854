"""Write ``theora_vorbis.ogv``: the committed Ogg/Theora fixture of the media corpus.

PyAV's bundled FFmpeg decodes Theora but has no Theora encoder, so the corpus cannot encode
this pair in the test like the others. This script made the fixture once, offline: Theora
frames from libtheora's encoder (``libtheoraenc.so.1``) and Ogg pages from ``libogg.so.0``
via ctypes, then PyAV remuxes that stream with Vorbis audio from FFmpeg's own encoder.

    python -m tests.media.make_theora LIBDIR  # LIBDIR: libtheora{enc,dec}.so.1, libogg.so.0

(on Debian: ``dpkg -x libtheora0_*.deb`` and ``dpkg -x libogg0_*.deb``). The video is the
corpus pattern: 20 frames at 10 fps, 64x48, frame i a flat colour with red ``frame_red(i)``;
the audio a 1 kHz tone, stereo, 44.1 kHz, 2 s.
"""

from __future__ import annotations

import ctypes as C
import io
import sys
from pathlib import Path

import av
import numpy as np

from tests.worker.core.media_fixtures import ClipSpec, _add_audio, _write_audio, frame_red

FIXTURE = Path(__file__).with_name("theora_vorbis.ogv")
SPEC = ClipSpec(container="ogg", video_codec=None, audio_codec="vorbis", seconds=2.0)
SHIFT = 6  # keyframe_granule_shift: a keyframe at least every 2**SHIFT frames


class ThInfo(C.Structure):
    _fields_ = [
        ("version", C.c_ubyte * 3),
        *((name, C.c_uint32) for name in ("frame_width", "frame_height", "pic_width")),
        *((name, C.c_uint32) for name in ("pic_height", "pic_x", "pic_y", "fps_numerator")),
        *((name, C.c_uint32) for name in ("fps_denominator", "aspect_num", "aspect_den")),
        *((name, C.c_int) for name in ("colorspace", "pixel_fmt", "target_bitrate")),
        *((name, C.c_int) for name in ("quality", "keyframe_granule_shift")),
    ]


class Plane(C.Structure):
    _fields_ = [("width", C.c_int), ("height", C.c_int), ("stride", C.c_int), ("data", C.c_void_p)]


class Comment(C.Structure):
    _fields_ = [("user_comments", C.c_void_p), ("lengths", C.c_void_p), ("comments", C.c_int)]
    _fields_ += [("vendor", C.c_char_p)]


class OggPacket(C.Structure):
    _fields_ = [("packet", C.c_void_p), ("bytes", C.c_long), ("bos", C.c_long)]
    _fields_ += [("eos", C.c_long), ("granulepos", C.c_int64), ("packetno", C.c_int64)]


class OggPage(C.Structure):
    _fields_ = [("header", C.c_void_p), ("header_len", C.c_long)]
    _fields_ += [("body", C.c_void_p), ("body_len", C.c_long)]


def theora_ogg(libdir: Path) -> bytes:
    """An Ogg file with one Theora stream of SPEC's frames."""
    ogg = C.CDLL(str(libdir / "libogg.so.0"), mode=C.RTLD_GLOBAL)
    dec = C.CDLL(str(libdir / "libtheoradec.so.1"), mode=C.RTLD_GLOBAL)  # th_info, th_comment
    th = C.CDLL(str(libdir / "libtheoraenc.so.1"))
    th.th_encode_alloc.restype = C.c_void_p
    info = ThInfo()
    dec.th_info_init(C.byref(info))
    info.frame_width, info.frame_height = SPEC.width, SPEC.height
    info.pic_width, info.pic_height = SPEC.width, SPEC.height
    info.fps_numerator, info.fps_denominator, info.quality = SPEC.fps, 1, 63
    info.aspect_num = info.aspect_den = 1
    info.keyframe_granule_shift = SHIFT
    encoder = C.c_void_p(th.th_encode_alloc(C.byref(info)))
    stream = C.create_string_buffer(4096)  # ogg_stream_state (~400 bytes)
    ogg.ogg_stream_init(stream, 1)
    out, packet, comment = io.BytesIO(), OggPacket(), Comment()
    dec.th_comment_init(C.byref(comment))
    while th.th_encode_flushheader(encoder, C.byref(comment), C.byref(packet)) > 0:
        ogg.ogg_stream_packetin(stream, C.byref(packet))
        _pages(ogg, stream, out, ogg.ogg_stream_flush)  # headers on pages of their own
    frames = round(SPEC.seconds * SPEC.fps)
    for index in range(frames):
        planes = _planes(index)
        th.th_encode_ycbcr_in(encoder, (Plane * 3)(*(p for p, _ in planes)))
        while th.th_encode_packetout(encoder, int(index == frames - 1), C.byref(packet)) > 0:
            ogg.ogg_stream_packetin(stream, C.byref(packet))
            _pages(ogg, stream, out, ogg.ogg_stream_pageout)
    _pages(ogg, stream, out, ogg.ogg_stream_flush)
    return out.getvalue()


def _planes(index: int) -> list[tuple[Plane, np.ndarray]]:
    """Y, Cb, Cr planes of frame ``index`` (4:2:0), with the arrays that keep them alive."""
    rgb = np.zeros((SPEC.height, SPEC.width, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = frame_red(index), 128, 64
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    arrays = [np.ascontiguousarray(frame.to_ndarray()[: SPEC.height])]
    chroma = frame.to_ndarray()[SPEC.height :].reshape(2, SPEC.height // 2, SPEC.width // 2)
    arrays += [np.ascontiguousarray(plane) for plane in chroma]
    planes = [Plane(a.shape[1], a.shape[0], a.shape[1], a.ctypes.data) for a in arrays]
    return list(zip(planes, arrays, strict=True))


def _pages(ogg, stream, out: io.BytesIO, take) -> None:
    page = OggPage()
    while take(stream, C.byref(page)):
        out.write(C.string_at(page.header, page.header_len))
        out.write(C.string_at(page.body, page.body_len))


def with_vorbis(theora: bytes) -> bytes:
    """Interleave the Theora stream's pages with an Ogg/Vorbis stream of SPEC's tone, by time.

    (PyAV cannot remux Theora: its stream templates need an encoder.) Ogg multiplexes logical
    streams page by page, so the pages are kept as they are: first every stream's first page
    (BOS), then the rest ordered by the time their granule position stands for.
    """
    vorbis = io.BytesIO()
    with av.open(vorbis, "w", format="ogg") as target:
        _write_audio(target, _add_audio(target, SPEC), SPEC)
    pages = _timed_pages(theora, _theora_seconds) + _timed_pages(vorbis.getvalue(), _vorbis_seconds)
    return b"".join(page for *_, page in sorted(pages, key=lambda p: p[:2]))


def _timed_pages(data: bytes, seconds) -> list[tuple[int, float, bytes]]:
    """(0 for a first page else 1, time, page bytes) for each page of a one-stream Ogg."""
    pages, offset, time = [], 0, 0.0
    while offset < len(data):
        segments = data[offset + 26]
        length = 27 + segments + sum(data[offset + 27 : offset + 27 + segments])
        granule = int.from_bytes(data[offset + 6 : offset + 14], "little", signed=True)
        time = seconds(granule) if granule > 0 else time  # -1: no packet ends on this page
        pages.append((0 if data[offset + 5] & 2 else 1, time, data[offset : offset + length]))
        offset += length
    return pages


def _theora_seconds(granule: int) -> float:
    return ((granule >> SHIFT) + (granule & ((1 << SHIFT) - 1))) / SPEC.fps


def _vorbis_seconds(granule: int) -> float:
    return granule / SPEC.sample_rate


if __name__ == "__main__":
    FIXTURE.write_bytes(with_vorbis(theora_ogg(Path(sys.argv[1]))))
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
