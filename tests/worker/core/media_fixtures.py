"""Real encoded clips for the media tests, written with PyAV in memory.

Video frame i is a flat colour whose red channel encodes i (``frame_red``), so a test can read
back which source frame a decoded frame came from. Audio is a sine tone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    """What to encode: container, codecs, length and stream parameters."""

    container: str = "mp4"
    video_codec: str | None = "libx264"  # None: no video stream
    audio_codec: str | None = "aac"  # None: no audio stream
    seconds: float = 2.0
    fps: int = 10
    width: int = 64
    height: int = 48
    sample_rate: int = 44100
    layout: str = "stereo"
    tone_hz: float = 1000.0
    audio_offset_s: float = 0.0  # the audio starts this long after the video
    gop: int = 0  # keyframe interval in frames; 0: the encoder's default
    preset: str = "ultrafast"  # libx264 preset; veryfast and slower use B-frames
    pix_fmt: str = "yuv420p"  # e.g. yuv420p10le for 10-bit video
    video_options: tuple[tuple[str, str], ...] = ()  # encoder options (name, value)
    rotation: int = 0  # display rotation in degrees (a display matrix in the container)
    vfr: bool = False  # variable frame rate: frame i lasts 1, 2 or 3 ticks of 1/fps/2
    container_options: tuple[tuple[str, str], ...] = ()  # muxer options (name, value)
    audio_bit_rate: int = 0  # 0: the encoder's default (wmav2 needs one)


RED_STEP = 16  # red levels between consecutive frames; the pattern repeats every 14 frames


def frame_red(index: int) -> int:
    """Red level of source frame ``index``: steps of RED_STEP from 16, wrapping below 240."""
    return 16 + (RED_STEP * index) % 224


def frame_index_from_red(red: float, near: int) -> int:
    """Source frame index within 6 of ``near`` whose red level is closest to ``red``."""
    candidates = [i for i in range(near - 6, near + 7) if i >= 0]
    return min(candidates, key=lambda i: abs(frame_red(i) - red))


def encode_clip(spec: ClipSpec) -> bytes:
    """Encode ``spec`` to container bytes."""
    buffer = io.BytesIO()
    options = dict(spec.container_options)
    with av.open(buffer, "w", format=spec.container, options=options) as container:
        video = _add_video(container, spec) if spec.video_codec else None
        audio = _add_audio(container, spec) if spec.audio_codec else None
        if video is not None:
            _write_video(container, video, spec)
        if audio is not None:
            _write_audio(container, audio, spec)
    return buffer.getvalue()


def _add_video(container: av.container.OutputContainer, spec: ClipSpec) -> av.VideoStream:
    stream = container.add_stream(spec.video_codec, rate=spec.fps)
    stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
    preset = {"preset": spec.preset} if spec.video_codec == "libx264" else {}
    stream.options = preset | dict(spec.video_options)
    if spec.vfr:
        stream.codec_context.time_base = Fraction(1, 2 * spec.fps)
    if spec.rotation:
        stream.set_display_rotation(spec.rotation)
    stream.bit_rate = 2_000_000  # enough for flat frames to keep their exact colour
    if spec.gop:
        stream.codec_context.gop_size = spec.gop
    return stream


def _add_audio(container: av.container.OutputContainer, spec: ClipSpec) -> av.AudioStream:
    stream = container.add_stream(spec.audio_codec, rate=spec.sample_rate)
    stream.layout = spec.layout
    stream.format = stream.codec_context.codec.audio_formats[0].name
    if spec.audio_codec == "vorbis":  # FFmpeg's own Vorbis encoder (stereo only)
        stream.codec_context.options = {"strict": "experimental"}
    if spec.audio_bit_rate:
        stream.bit_rate = spec.audio_bit_rate
    return stream


def _write_video(container, stream, spec: ClipSpec) -> None:
    for index, pts in enumerate(_video_pts(spec)):
        rgb = np.zeros((spec.height, spec.width, 3), np.uint8)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = frame_red(index), 128, 64
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = pts
        container.mux(stream.encode(frame.reformat(format=spec.pix_fmt)))
    container.mux(stream.encode(None))


def _video_pts(spec: ClipSpec) -> list[int]:
    """Frame timestamps in 1/fps, or in 1/(2 fps) with durations cycling 1, 2, 3 ticks (vfr)."""
    if not spec.vfr:
        return list(range(round(spec.seconds * spec.fps)))
    ends = np.cumsum([1 + i % 3 for i in range(round(spec.seconds * spec.fps))])
    return [0] + [int(end) for end in ends if end < 2 * spec.seconds * spec.fps]


def _write_audio(container, stream, spec: ClipSpec) -> None:
    fmt = av.AudioFormat(stream.format.name)
    channels = stream.layout.nb_channels
    chunk = stream.codec_context.frame_size or 1024
    samples = tone(spec.tone_hz, spec.seconds - spec.audio_offset_s, spec.sample_rate)
    offset = round(spec.audio_offset_s * spec.sample_rate)
    for start in range(0, samples.size, chunk):
        piece = np.repeat(samples[None, start : start + chunk], channels, axis=0)
        frame = av.AudioFrame.from_ndarray(_as_format(piece, fmt), fmt.name, spec.layout)
        frame.sample_rate, frame.pts = spec.sample_rate, offset + start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def tone(freq_hz: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine, (round(seconds * sample_rate),) float32."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _as_format(piece: np.ndarray, fmt: av.AudioFormat) -> np.ndarray:
    """(channels, n) float -> the array layout and dtype ``AudioFrame.from_ndarray`` wants."""
    if fmt.name.startswith("s16"):
        piece = (piece * 32767).astype(np.int16)
    elif fmt.name.startswith("s32"):
        piece = (piece * 2147483647).astype(np.int32)
    return piece if fmt.is_planar else piece.T.reshape(1, -1)
