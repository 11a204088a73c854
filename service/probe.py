"""Cheap validation of an uploaded clip with PyAV: open, inspect streams, decode a frame each.

Runs in the API process (no torch). It opens the upload with the worker's hardened open
(:mod:`contract.media_open`: no protocols, no demuxer that follows paths, bounded probing,
decoders capped at the pixel limit), reads container headers and decodes at most one video
frame and one audio frame, so a 10 s clip costs a few milliseconds, not a full decode. The
decoded frame's size is checked as the header's is (a header says nothing of the frames).

The contract with the worker (docs/media.md): anything this accepts, ``decode_clip`` decodes.
A header without a duration (SWF, FLV without metadata) is accepted within the body-size
limit; the worker finds the length while decoding. The probe never decodes more than
``max_probe_packets`` packets to find out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av

from contract.media_open import (
    FrameTooLarge,
    RefusedFormat,
    decodable,
    open_media,
    refused_frame_size,
    video_streams,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeLimits:
    """What the API accepts; each limit has a reason code in :class:`ProbeError`."""

    max_duration_s: float = 3 * 3600.0  # longer uploads are cut into windows (contract.windows)
    min_duration_s: float = 0.2  # shorter clips carry too little audio for one fbank window
    max_width: int = 4096  # DCI 4K (4096x2160); the worker allows up to 4096x2304 pixels
    max_height: int = 2160
    min_side: int = 16  # smaller frames carry no picture once scaled up to the model's size
    max_streams: int = 8  # real clips have 2-4; dozens is an attack on the demuxer
    max_probe_packets: int = 400  # packets demuxed while looking for a first frame of each


@dataclass(frozen=True)
class ProbeResult:
    format: str
    duration_s: float | None  # None: the header does not say (the worker finds the length)
    width: int
    height: int
    sample_rate: int
    streams: int


class ProbeError(ValueError):
    """A rejected upload; ``code`` is a stable machine-readable reason, ``status`` the HTTP one."""

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code = code
        self.status = status


def probe_clip(data: bytes | Path, limits: ProbeLimits) -> ProbeResult:
    """Validate ``data`` (bytes, or a file holding them) as an audio-video clip; raise
    :class:`ProbeError` with a reason: 415 ``refused_format`` for a demuxer that follows paths
    (nothing else is opened), 422 ``resolution_too_large`` for a decoded frame over the limit."""
    max_pixels = limits.max_width * limits.max_height
    try:
        with open_media(data, max_pixels, metadata_errors="ignore") as container:
            return _inspect(container, limits)
    except ProbeError:
        raise
    except RefusedFormat as exc:
        raise ProbeError(exc.code, str(exc), 415) from exc
    except FrameTooLarge as exc:
        raise ProbeError("resolution_too_large", str(exc)) from exc
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as exc:
        too_large = refused_frame_size(exc, max_pixels)
        if too_large is not None:
            raise ProbeError("resolution_too_large", str(too_large)) from exc
        raise ProbeError("undecodable", f"not a decodable media file: {exc}", 415) from exc


def _inspect(container, limits: ProbeLimits) -> ProbeResult:
    streams = container.streams
    if len(streams) > limits.max_streams:
        raise ProbeError("too_many_streams", f"{len(streams)} streams > {limits.max_streams}")
    videos = video_streams(container)
    if not videos:
        cover = " (an attached picture, cover art, is not video)" if streams.video else ""
        raise ProbeError("no_video", f"the file has no video stream{cover}")
    if not streams.audio:
        raise ProbeError("no_audio", "the file has no audio stream")
    video, audio = decodable(videos[0]), decodable(streams.audio[0])  # else 415 undecodable
    _check_size(video.codec_context.width, video.codec_context.height, limits)
    duration = _duration(container, video, audio)
    _check_duration(duration, limits)
    _decode_first_frames(container, video, audio, limits)
    return ProbeResult(
        format=container.format.name,
        duration_s=duration,
        width=video.codec_context.width,
        height=video.codec_context.height,
        sample_rate=audio.codec_context.sample_rate or 0,
        streams=len(streams),
    )


def _check_size(width: int, height: int, limits: ProbeLimits) -> None:
    if width <= 0 or height <= 0:
        raise ProbeError("bad_resolution", f"video stream has no valid size ({width}x{height})")
    if min(width, height) < limits.min_side:
        raise ProbeError(
            "resolution_too_small", f"{width}x{height} has a side under {limits.min_side} px"
        )
    if width > limits.max_width or height > limits.max_height:
        raise ProbeError(
            "resolution_too_large",
            f"{width}x{height} exceeds {limits.max_width}x{limits.max_height}",
        )


def _duration(container, video, audio) -> float | None:
    """Seconds, from the container header, else the longest stream header; None if none says."""
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    spans = [float(s.duration * s.time_base) for s in (video, audio) if s.duration and s.time_base]
    return max(spans, default=None)


def _check_duration(duration: float | None, limits: ProbeLimits) -> None:
    if duration is None:  # bounded by the body-size limit; the worker finds the length
        return
    if duration > limits.max_duration_s:
        raise ProbeError(
            "too_long", f"duration {duration:.1f} s exceeds {limits.max_duration_s:.0f} s"
        )
    if duration < limits.min_duration_s:
        raise ProbeError(
            "too_short", f"duration {duration:.2f} s is under {limits.min_duration_s} s"
        )


def _decode_first_frames(container, video, audio, limits: ProbeLimits) -> None:
    """Decode until one video and one audio frame came out; a file that can't is refused, as
    is a decoded frame whose size the header check would refuse."""
    video.thread_type = "SLICE"  # one frame: no frame threads (nor their buffers)
    need = {video.index: "video", audio.index: "audio"}
    for n, packet in enumerate(container.demux(video, audio)):
        if n >= limits.max_probe_packets:
            break
        frames = packet.decode() if packet.stream.index in need else []
        if packet.stream.index == video.index:
            for frame in frames:
                _check_size(frame.width, frame.height, limits)
        if frames:
            del need[packet.stream.index]
        if not need:
            return
    missing = " and ".join(sorted(need.values()))
    raise ProbeError("undecodable", f"no decodable {missing} frame in the file", 415)
