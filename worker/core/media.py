"""Decode clip bytes (any container/codec FFmpeg reads) into model inputs.

``decode_clip(bytes) -> Clip`` gives the CAV-MAE inputs (docs/design.md section 2):

Audio and video of one example come from the **same time span** (the aligned window,
``example_window``; docs/media.md states it per preset):

- the span lasts ``audio_s = audio_frames x 10 ms`` (tiny 2.56 s, small 5.12 s, base 10.24 s),
  starts at ``start_s`` (centred in the clip at eval, a random start drawn from ``generator`` in
  training) and is the whole clip when the clip is shorter;
- audio: the span's samples, resampled to mono ``sample_rate``, waveform mean removed, Kaldi
  log-mel fbank, then padded (with zeros, as CAV-MAE pads the raw fbank) or cut to
  ``audio_frames`` frames and normalised (x - fbank_mean) / fbank_std;
- video: ``num_frames`` frames at the centres of equal slices of a video window of
  ``min(video_window_s, span)`` inside the span (centred at eval, anywhere in the span in
  training). Each target takes the decoded frame nearest in time. Frames are resized so the
  shorter side is ``frame_size`` (bicubic), centre-cropped to a square (as CAV-MAE's Resize +
  CenterCrop) and normalised with ImageNet mean/std.

Untrusted bytes: containers are opened by ``contract.media_open.open_media``, the API probe's
open (no protocols, no demuxer that follows paths, bounded probing, decoders capped at
``max_pixels``), and every decoded frame is checked against ``max_pixels`` (MediaTooLarge):
a header's frame size says nothing of the frames that follow.

Time is measured from the container's start time. Decoding seeks to the keyframe before the first
target and stops after the last one (a seek that fails or yields nothing falls back to decoding
from the start); audio stops after the samples it needs. A header without a duration (SWF,
FLV without metadata) is fine: the span then starts at 0 and the audio decoded tells the length.

Threads: small frames are decoded on one thread. On a small machine call this with
``torch.set_num_threads(1)`` (as DataLoader workers do): torch's idle OpenMP threads spin and
compete with FFmpeg, which made a 10 s clip ~3x slower on 2 cores.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch
from torch import Tensor

from contract.media_open import (
    FrameTooLarge,
    RefusedFormat,
    check_frame,
    decodable,
    open_media,
    refused_frame_size,
    video_streams,
)
from worker.core.fbank import kaldi_fbank, num_samples_for_frames

logger = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
_THREADED_PIXELS = 640 * 480  # decode larger frames with FFmpeg's threads
_RESAMPLE_CHUNK = 8192  # samples per resampled frame (0.5 s at 16 kHz)
AUDIO_SEEK_MIN_S = 1.0  # spans starting later are reached by a seek, not by decoding up to them
FBANK_SHIFT_S = 0.010  # one fbank frame per 10 ms: audio_frames x this = the example's span


@dataclass(frozen=True)
class MediaConfig:
    """How clips become model inputs; the defaults are CAV-MAE's ``base`` settings."""

    sample_rate: int = 16000  # audio is resampled to this rate, mono
    audio_frames: int = 1024  # fbank frames (10 ms shift) kept: 10.24 s
    mel_bins: int = 128  # mel filters per frame
    fbank_mean: float = -5.081  # CAV-MAE's fbank statistics: (x - mean) / std
    fbank_std: float = 4.4849
    num_frames: int = 4  # video frames per clip
    frame_size: int = 224  # square frame side after resize + centre crop
    video_window_s: float = 4.0  # frames are spread evenly over a window this long
    max_duration_s: float = 3 * 3600.0  # longer media is refused (MediaTooLarge), as by the API
    max_pixels: int = 4096 * 2304  # larger frames (header or decoded) are refused (MediaTooLarge)


@dataclass
class Clip:
    """Model inputs for one clip."""

    fbank: Tensor  # (audio_frames, mel_bins) float32, normalised
    frames: Tensor  # (num_frames, 3, frame_size, frame_size) float32, ImageNet-normalised
    duration_s: float  # length of the media in seconds


class MediaError(ValueError):
    """The bytes are not a clip we can use; the message says why."""


class NoAudioStream(MediaError):
    """The media has no audio stream."""


class NoVideoStream(MediaError):
    """The media has no video stream (a cover picture does not count)."""


class UndecodableMedia(MediaError):
    """FFmpeg cannot read the container or decode a stream (or its format is refused)."""


class MediaTooLarge(MediaError):
    """The media is longer or its frames larger than MediaConfig allows."""


Source = bytes | str | os.PathLike  # container bytes, or the path of a file holding them


def decode_clip(
    data: Source,
    cfg: MediaConfig | None = None,
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
    start_s: float | None = None,
) -> Clip:
    """Decode a container (bytes or a file path) into a Clip; raises a MediaError subclass on
    bad input.

    ``train`` draws the span's and the video window's positions from ``generator``; eval takes
    the centre. ``start_s`` fixes the span's start instead (one window of a long upload, see
    ``contract.windows``): audio and frames are then decoded from a seek near it, so a window
    an hour in costs what the first one does.
    """
    cfg = cfg or MediaConfig()
    if isinstance(data, bytes | bytearray) and not data:
        raise UndecodableMedia("empty input: no bytes to decode")
    try:
        return _decode(data, cfg, train, generator, start_s)
    except MediaError:
        raise
    except RefusedFormat as err:
        raise UndecodableMedia(str(err)) from err
    except FrameTooLarge as err:
        raise MediaTooLarge(str(err)) from err
    except (av.FFmpegError, ValueError, OSError) as err:
        too_large = refused_frame_size(err, cfg.max_pixels)
        if too_large is not None:
            raise MediaTooLarge(str(too_large)) from err
        reason = getattr(err, "strerror", None) or str(err)
        raise UndecodableMedia(f"FFmpeg cannot decode the media: {reason}") from err


def _decode(
    data: Source,
    cfg: MediaConfig,
    train: bool,
    generator: torch.Generator | None,
    start_s: float | None,
) -> Clip:
    """decode_clip without the error translation."""
    # One open for the header, the audio and the frames: opening parses the container's index
    # (41 ms for a 1-hour MP4, bench/results/windows/); only a failed seek opens it again.
    with open_media(data, cfg.max_pixels) as container:
        _audio_stream(container)  # refuses media without one before anything is decoded
        video = _video_stream(container)
        duration = _duration_s(container)
        _check_limits(video, duration, cfg)
        if start_s is not None:
            start = max(0.0, start_s)
        else:  # a header without a duration: the span starts at 0, the audio tells the length
            start = 0.0 if duration is None else _span_start(duration, cfg, train, generator)
        waveform = _decode_waveform(container, data, cfg, start)
        if duration is None:
            duration = start + waveform.size / cfg.sample_rate
        window = _window_at(start, duration, cfg, train, generator)
        times = list(window.frame_times)
        frames = _decode_frames(container, data, times, cfg.frame_size, cfg.max_pixels)
    fbank = audio_features(torch.from_numpy(waveform), cfg)
    return Clip(fbank=fbank, frames=frames, duration_s=duration)


def _audio_stream(container: av.container.InputContainer) -> av.AudioStream:
    """The first audio stream."""
    if not container.streams.audio:
        raise NoAudioStream(f"no audio stream in the {container.format.name} media")
    return decodable(container.streams.audio[0])


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    """The first video stream that is not an attached (cover) picture."""
    videos = video_streams(container)
    if not videos:
        raise NoVideoStream(f"no video stream in the {container.format.name} media")
    return decodable(videos[0])


def _duration_s(container: av.container.InputContainer) -> float | None:
    """Media length in seconds: the container's, else the longest stream's, else None."""
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    ends = [
        float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base
    ]
    return max(ends) if ends else None


def _check_limits(video: av.VideoStream, duration: float | None, cfg: MediaConfig) -> None:
    """Refuse media whose length or frame size exceeds the configured guards."""
    if duration is not None and duration > cfg.max_duration_s:
        raise MediaTooLarge(f"media lasts {duration:.1f} s, over the {cfg.max_duration_s} s limit")
    pixels = video.codec_context.width * video.codec_context.height
    if pixels > cfg.max_pixels:
        raise MediaTooLarge(f"frames have {pixels} pixels, over the {cfg.max_pixels} limit")


# ---------------------------------------------------------------------------------------- audio


def _decode_waveform(
    container: av.container.InputContainer, data: Source, cfg: MediaConfig, start_s: float = 0.0
) -> np.ndarray:
    """Mono float32 waveform at cfg.sample_rate from ``start_s`` on (s from the container start),
    from ``container`` just opened (``data`` reopens it after a failed seek).

    n = the samples the fbank needs, or fewer when the audio ends first. A span that starts
    later than ``AUDIO_SEEK_MIN_S`` is reached by a seek (to the packet at or before it); a seek
    that fails, lands after the span's start or decodes nothing is abandoned for a decode from
    the start, as for frames.
    """
    if start_s <= AUDIO_SEEK_MIN_S:
        samples = _waveform(container, cfg, start_s, seek=False)
    else:
        try:
            samples = _waveform(container, cfg, start_s, seek=True)
        except av.FFmpegError as err:
            logger.debug("audio seek to %.3f s failed (%s): decoding from the start", start_s, err)
            samples = None
        if samples is None:
            with open_media(data, cfg.max_pixels) as fresh:
                samples = _waveform(fresh, cfg, start_s, seek=False)
    assert samples is not None  # without a seek nothing lands late
    return samples


def _waveform(
    container: av.container.InputContainer, cfg: MediaConfig, start_s: float, seek: bool
) -> np.ndarray | None:
    """The span's samples, after a seek when ``seek`` (else from where ``container`` stands:
    its start); None if that seek landed late or on nothing. Without a seek, silence is padded
    where the audio itself starts late."""
    needed = num_samples_for_frames(cfg.audio_frames, cfg.sample_rate)
    rate = cfg.sample_rate
    stream = _audio_stream(container)
    origin = _origin_s(container)
    if seek:
        _seek(container, stream, origin + start_s)
    frames = container.decode(stream)
    first = next(frames, None)
    if first is None:
        if seek:
            return None
        raise UndecodableMedia("the audio stream decoded to no samples")
    first_time = first.time if first.time is not None else origin
    skip = round((origin + start_s - first_time) * rate)  # < 0: audio begins after start
    if seek and skip < 0:
        logger.debug("audio seek landed at %.3f s, after %.3f s", first_time - origin, start_s)
        return None
    samples = _resample_mono(itertools.chain([first], frames), rate, max(skip, 0) + needed)
    end = _stream_end_s(stream, origin)
    samples = samples[skip:] if skip >= 0 else np.pad(samples, (min(-skip, needed), 0))
    # no end in the header: what decoded is all there is (the caller derives the length)
    available = samples.size if end is None else round((end - start_s) * rate)
    return _fit(samples, max(0, min(needed, available)))


def _resample_mono(frames: Iterable[av.AudioFrame], rate: int, limit: int) -> np.ndarray:
    """Resample decoded frames to mono float32 (n,) at ``rate`` until ``limit`` samples.

    One resampler per clip; flushed with None at the end. It hands out ``_RESAMPLE_CHUNK``
    samples at a time, not one small frame per packet: a third of the per-packet cost.
    """
    resampler = av.AudioResampler(
        format="flt", layout="mono", rate=rate, frame_size=_RESAMPLE_CHUNK
    )
    chunks: list[np.ndarray] = []
    count = 0
    for frame in frames:
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
            count += out.samples
        if count >= limit:
            break
    chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _fit(samples: np.ndarray, length: int) -> np.ndarray:
    """Cut ``samples`` to ``length`` or pad it with trailing zeros."""
    return np.pad(samples[:length], (0, max(0, length - samples.size)))


def _origin_s(container: av.container.InputContainer) -> float:
    """The container's start time in seconds (0 when unknown): time 0 of the clip."""
    return container.start_time / av.time_base if container.start_time is not None else 0.0


def _stream_end_s(stream: av.stream.Stream, origin: float) -> float | None:
    """When ``stream`` ends, in seconds from ``origin``; None when it does not say."""
    if not stream.duration or stream.time_base is None:
        return None
    start = stream.start_time * stream.time_base if stream.start_time is not None else origin
    return float(start + stream.duration * stream.time_base) - origin


def audio_features(waveform: Tensor, cfg: MediaConfig) -> Tensor:
    """Mono waveform (n,) at cfg.sample_rate -> normalised fbank (audio_frames, mel_bins).

    Like CAV-MAE: the raw log-mel fbank is zero-padded (or cut) to audio_frames, then normalised,
    so padded frames hold -fbank_mean / fbank_std.
    """
    fbank = kaldi_fbank(waveform - waveform.mean(), cfg.sample_rate, cfg.mel_bins)
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, cfg.audio_frames - len(fbank))))
    return (fbank[: cfg.audio_frames] - cfg.fbank_mean) / cfg.fbank_std


# ---------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class ExampleWindow:
    """The time span of one example: its audio and its video frames come from it."""

    start_s: float  # where the audio starts, seconds from the clip start
    audio_s: float  # audio_frames x 10 ms (the fbank's span; shorter clips are zero-padded)
    frame_times: tuple[float, ...]  # video frame times, s from the clip start, inside the span


def example_window(
    duration_s: float,
    cfg: MediaConfig,
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> ExampleWindow:
    """The aligned span of a clip ``duration_s`` long (see the module docstring).

    Eval: the span is centred in the clip and the video window in the span. Training draws
    both positions from ``generator`` (span start first, then the video window's).
    """
    start = _span_start(duration_s, cfg, train, generator)
    return _window_at(start, duration_s, cfg, train, generator)


def _span_start(
    duration_s: float, cfg: MediaConfig, train: bool, generator: torch.Generator | None
) -> float:
    slack = max(0.0, duration_s - cfg.audio_frames * FBANK_SHIFT_S)
    return slack * _position(train, generator)


def _window_at(
    start_s: float,
    duration_s: float,
    cfg: MediaConfig,
    train: bool,
    generator: torch.Generator | None,
) -> ExampleWindow:
    """The span starting at ``start_s``, with its video window placed inside it."""
    audio_s = cfg.audio_frames * FBANK_SHIFT_S
    span = max(0.0, min(audio_s, duration_s - start_s))
    window = min(cfg.video_window_s, span)
    first = start_s + (span - window) * _position(train, generator)
    step = window / cfg.num_frames
    times = tuple(first + (i + 0.5) * step for i in range(cfg.num_frames))
    return ExampleWindow(start_s, audio_s, times)


def _position(train: bool, generator: torch.Generator | None) -> float:
    """Where a window sits in its slack: 0.5 (centred) at eval, uniform in [0, 1) in training."""
    return torch.rand((), generator=generator).item() if train else 0.5


def frame_times(
    duration_s: float,
    cfg: MediaConfig,
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> list[float]:
    """The video frame times of ``example_window`` (s from the clip start), increasing."""
    return list(example_window(duration_s, cfg, train=train, generator=generator).frame_times)


def _decode_frames(
    container: av.container.InputContainer,
    data: Source,
    times: list[float],
    size: int,
    max_pixels: int,
) -> Tensor:
    """Frames nearest ``times`` as (len(times), 3, size, size) float32, ImageNet-normalised;
    FrameTooLarge for any decoded frame over ``max_pixels``.

    Seeks ``container`` to the keyframe before the first target. A seek that fails, lands after
    the target, or leaves the decoder with no frame (no keyframe after the landing point) or an
    error (FFmpeg's bare -1, "Operation not permitted", as Theora gives for packets out of
    context) is abandoned: ``data`` is opened again and the frames are decoded from the start,
    which every accepted file allows.
    """
    try:
        frames = _pick_frames(container, times, size, seek=True, max_pixels=max_pixels)
    except (av.FFmpegError, UndecodableMedia) as err:  # a failed seek leaves the demuxer anywhere
        logger.debug("decoding after a seek failed (%s): decoding from the start", err)
        frames = None
    if frames is None:
        with open_media(data, max_pixels) as fresh:
            frames = _pick_frames(fresh, times, size, seek=False, max_pixels=max_pixels)
    assert frames is not None  # without a seek nothing lands late
    return frames


def _pick_frames(
    container: av.container.InputContainer,
    times: list[float],
    size: int,
    seek: bool,
    max_pixels: int = MediaConfig.max_pixels,
) -> Tensor | None:
    """The frames nearest ``times``, after a seek when ``seek`` (else from where ``container``
    stands: its start); None if the seek landed too late."""
    stream = _video_stream(container)
    _set_threads(stream)
    targets = [_origin_s(container) + t for t in times]
    if seek:
        _seek(container, stream, targets[0])
    step = 1 / float(stream.average_rate or 25)  # for frames without a timestamp
    decoded = _checked(container.decode(stream), max_pixels)
    picked, first = _nearest_frames(decoded, targets, step)
    if seek and first > targets[0]:
        logger.debug("seek landed at %.3f s, after %.3f s", first, targets[0])
        return None
    return torch.stack([_frame_tensor(frame, size) for frame in picked])


def _checked(frames: Iterable[av.VideoFrame], max_pixels: int) -> Iterator[av.VideoFrame]:
    """``frames``, each refused (FrameTooLarge) when over ``max_pixels``."""
    for frame in frames:
        check_frame(frame, max_pixels)
        yield frame


def _set_threads(stream: av.VideoStream) -> None:
    """Frame threads for large frames only: on small ones they cost more than they save."""
    large = stream.codec_context.width * stream.codec_context.height > _THREADED_PIXELS
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = 0 if large else 1  # 0: FFmpeg picks


def _seek(container: av.container.InputContainer, stream: av.stream.Stream, target: float) -> None:
    """Seek to the keyframe at or before ``target`` seconds (the start for a target at or before
    0, or a stream without a time base); raises av.FFmpegError if it fails. Always moves: the
    container may have been read further already (the audio is decoded before the frames)."""
    if stream.time_base is None:
        container.seek(0)
    else:
        container.seek(int(max(target, 0.0) / stream.time_base), stream=stream, backward=True)


def _nearest_frames(
    frames: Iterable[av.VideoFrame], targets: list[float], step: float
) -> tuple[list[av.VideoFrame], float]:
    """For each increasing target time, the decoded frame nearest to it.

    Stops decoding after the last target; targets past the end get the last frame. Returns the
    picks and the first decoded frame's time.
    """
    picked: list[av.VideoFrame] = []
    previous, previous_time, first = None, -math.inf, None
    for frame in frames:
        time = frame.time if frame.time is not None else max(previous_time + step, 0.0)
        first = time if first is None else first
        while len(picked) < len(targets) and time >= targets[len(picked)]:
            target = targets[len(picked)]
            later_is_nearer = previous is None or time - target <= target - previous_time
            picked.append(frame if later_is_nearer or previous is None else previous)
        if len(picked) == len(targets):
            return picked, first
        previous, previous_time = frame, time
    if previous is None or first is None:
        raise UndecodableMedia("the video stream decoded to no frames")
    return picked + [previous] * (len(targets) - len(picked)), first


def _frame_tensor(frame: av.VideoFrame, size: int) -> Tensor:
    """Shorter side resized to ``size`` (bicubic), centre crop: (3, size, size), normalised."""
    scale = size / min(frame.width, frame.height)
    width = max(size, round(frame.width * scale))
    height = max(size, round(frame.height * scale))
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")
    top, left = (height - size) // 2, (width - size) // 2
    crop = torch.from_numpy(np.ascontiguousarray(rgb[top : top + size, left : left + size]))
    return (crop.permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
