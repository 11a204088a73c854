"""Hostile media for the tests: uploads that name other files, frames larger than their header
says, audio whose only picture is cover art. Each is made here, a few KB to a few hundred."""

from __future__ import annotations

import ctypes
import io
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def png(width: int, height: int) -> bytes:
    """One flat PNG image (large ones compress to a few KB)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = width, height, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), "rgb24")
        for packet in [*s.encode(frame), *s.encode(None)]:
            c.mux(packet)
    return buf.getvalue()


def _silence(container, stream, seconds: float) -> None:
    n = stream.codec_context.frame_size or 1152
    rate = stream.codec_context.sample_rate
    dtype = {"s16p": np.int16, "s32p": np.int32, "s16": np.int16}.get(stream.format.name)
    for start in range(0, int(seconds * rate), n):
        samples = np.zeros((1, n), dtype or np.float32)
        frame = av.AudioFrame.from_ndarray(samples, stream.format.name, "mono")
        frame.sample_rate, frame.pts = rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def png_mov(sizes: list[tuple[int, int]], seconds: float = 1.0) -> bytes:
    """A MOV whose PNG video frames have ``sizes`` (the header says the first), with AAC audio."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mov") as c:
        v = c.add_stream("png", rate=len(sizes))
        v.width, v.height, v.pix_fmt = *sizes[0], "rgb24"
        v.time_base = Fraction(1, len(sizes))
        a = c.add_stream("aac", rate=16000)
        for i, (width, height) in enumerate(sizes):
            packet = av.Packet(png(width, height))
            packet.stream, packet.time_base = v, v.time_base
            packet.pts = packet.dts = i
            packet.duration, packet.is_keyframe = 1, True
            c.mux(packet)
        _silence(c, a, seconds)
    return buf.getvalue()


def cover_art_mp3(seconds: float = 1.0) -> bytes:
    """An MP3 whose only picture is an attached one (ID3 cover art): audio, not video."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as c:
        a = c.add_stream("mp3", rate=16000)
        v = c.add_stream("png")
        v.width, v.height, v.pix_fmt = 64, 64, "rgb24"
        v.disposition = av.stream.Disposition.attached_pic
        packet = av.Packet(png(64, 64))
        packet.stream, packet.pts, packet.dts = v, 0, 0
        c.mux(packet)
        _silence(c, a, seconds)
    return buf.getvalue()


def path_following(target: str) -> dict[str, bytes]:
    """Uploads that ask a demuxer or a protocol to open ``target`` (a path), by name."""
    url = f"file:{target}"
    return {
        "concat list": f"ffconcat version 1.0\nfile '{target}'\n".encode(),
        "concat list, relative": f"ffconcat version 1.0\nfile '{Path(target).name}'\n".encode(),
        "concat list, file: url": f"ffconcat version 1.0\nfile '{url}'\n".encode(),
        "concat list, subfile:": (
            f"ffconcat version 1.0\nfile 'subfile,,start,0,end,4096,,:{target}'\n".encode()
        ),
        "concat list, tee:": f"ffconcat version 1.0\nfile 'tee:{target}'\n".encode(),
        "hls playlist": (
            f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{url}\n#EXT-X-ENDLIST\n".encode()
        ),
        "dash manifest": (
            '<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
            'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011" '
            'mediaPresentationDuration="PT1S"><Period><AdaptationSet mimeType="video/mp4">'
            f'<Representation id="1" bandwidth="1000"><BaseURL>{url}</BaseURL>'
            "</Representation></AdaptationSet></Period></MPD>"
        ).encode(),
        "sdp session": (
            b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            b"m=video 5004 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
        ),
    }


# ---- watching a directory for opens (inotify, through libc) -------------------------------
IN_ACCESS, IN_OPEN = 0x1, 0x20


class OpenWatch:
    """Records every open or read of a file in ``folder`` by this process or any other, C code
    included (FFmpeg opens files itself): ``events()`` returns the names seen since the last call.
    """

    def __init__(self, folder: Path):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = IN_ACCESS | IN_OPEN
        if self._libc.inotify_add_watch(self.fd, str(folder).encode(), mask) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def events(self) -> list[str]:
        names = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset < len(buf):
                _, _, _, length = np.frombuffer(buf[offset : offset + 16], np.uint32)
                raw = buf[offset + 16 : offset + 16 + int(length)]
                names.append(raw.rstrip(b"\0").decode() or ".")
                offset += 16 + int(length)

    def close(self) -> None:
        os.close(self.fd)
