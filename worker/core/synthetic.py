"""Seeded synthetic drifting stream of audio-video clips, encoded to real MP4 bytes.

Each clip shows a moving, sounding object over a distracting background. The object's class
fixes its shape, its colour, its pitch and its timbre; every time the object bounces off a frame
edge its sound gets an onset (a sharp attack that decays). So the audio correlates with a small
set of video patches (the object) and with the moments of its bounces, which is what localized
audio-video alignment exploits. The background texture and an optional grey, silent distractor
object correlate with nothing.

The stream is split into segments (tasks). A segment fixes the active classes, the background
style and the noise levels (video noise, audio SNR); the stream visits segments in order, which
is the drift.

Conventions: frames are (T, H, W, 3) uint8 RGB; audio is (N,) float32 mono in [-1, 1];
positions are the (x, y) pixel coordinates of an object's top-left corner; times in seconds.
Everything about a clip follows from its `ClipSpec` and the `StreamConfig`.
"""

from __future__ import annotations

import colorsys
import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np

SHAPES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "diamond",
    "hourglass",
    "xcross",
    "halfdisc",
    "frame",
)
BACKGROUNDS = ("gradient", "stripes", "blobs", "checker")
# Harmonic amplitudes relative to the fundamental (always the loudest partial).
TIMBRES = (
    (1.0,),
    (1.0, 0.0, 0.45, 0.0, 0.25),
    (1.0, 0.5, 0.33, 0.25, 0.2),
    (1.0, 0.7, 0.5),
    (1.0, 0.0, 0.0, 0.6, 0.0, 0.0, 0.3),
)
SPLITS = ("train", "heldout")
MPEG4_BIT_RATE = 600_000  # the mpeg4 fallback encodes at a fixed bit rate (it has no CRF)


# ---------------------------------------------------------------------------------------------
# Configuration and clip identity
# ---------------------------------------------------------------------------------------------


class ClipTiming:
    """Clip length in samples and frames, for configs with seconds, sample_rate and fps."""

    seconds: float
    sample_rate: int
    fps: int

    @property
    def num_samples(self) -> int:
        """Audio samples per clip."""
        return round(self.seconds * self.sample_rate)

    @property
    def num_frames(self) -> int:
        """Video frames per clip."""
        return round(self.seconds * self.fps)


@dataclass(frozen=True)
class StreamConfig(ClipTiming):
    seconds: float = 3.0  # clip length; covers the `tiny` preset's 2.56 s of audio
    fps: int = 10  # video frame rate
    size: int = 128  # frame height and width in pixels (even, for yuv420p)
    sample_rate: int = 16000  # audio sample rate (Hz), mono
    num_classes: int = 10  # sounding object classes over the whole stream
    num_segments: int = 5  # tasks; the stream visits them in order
    classes_per_segment: int = 4  # classes active in one segment
    object_frac: float = 0.22  # object side as a fraction of the frame side
    speed: tuple[float, float] = (0.5, 0.9)  # object speed range, frame sides per second
    distractor_prob: float = 0.5  # chance a clip has a grey, silent distractor object
    second_object_prob: float = 0.0  # chance a clip has a second sounding object
    video_noise: tuple[float, ...] = (2.0, 5.0, 9.0)  # pixel noise std per segment (cycled)
    snr_db: tuple[float, ...] = (20.0, 10.0, 5.0, 15.0)  # audio SNR per segment (cycled)
    base_pitch: float = 220.0  # fundamental of class 0 (Hz)
    pitch_step: float = 3.0  # semitones between consecutive classes' fundamentals
    pitch_jitter: float = 0.015  # relative per-clip pitch variation (well under a semitone)
    codec: str = "libx264"  # video encoder; mpeg4 if libx264 is missing
    crf: int = 26  # libx264 constant rate factor (lower is better quality)
    audio_bit_rate: int = 48_000  # AAC bit rate

    def __post_init__(self) -> None:
        if self.size % 2 or self.size < 32:
            raise ValueError(f"size must be even and >= 32, got {self.size}")
        if not 1 <= self.classes_per_segment <= self.num_classes:
            raise ValueError("classes_per_segment must lie in [1, num_classes]")
        top = class_pitch(self, self.num_classes - 1) * (1 + self.pitch_jitter)
        if top >= self.sample_rate / 4:
            raise ValueError(f"highest class pitch {top:.0f} Hz too close to Nyquist")


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to regenerate one clip exactly (with the StreamConfig)."""

    segment: int  # the task this clip belongs to
    label: int  # class of the sounding object
    seed: int  # per-clip randomness (>= 0): motion, background, pitch jitter, noise
    label2: int | None = None  # class of an optional second sounding object

    @property
    def clip_id(self) -> str:
        """A readable, unique name: segment, label and seed."""
        return f"s{self.segment}-c{self.label}-{self.seed:016x}"


@dataclass(frozen=True)
class SegmentStyle:
    """What a segment (task) changes: active classes, background and noise levels."""

    classes: tuple[int, ...]
    background: str
    video_noise: float  # pixel noise std (0-255 scale)
    snr_db: float  # audio signal-to-noise ratio


@dataclass(frozen=True)
class Track:
    """One object's path. positions: (T, 2) int top-left (x, y) at each frame time."""

    label: int  # class, or -1 for the silent distractor
    size: int  # side of the object's square box in pixels
    positions: np.ndarray
    bounce_times: tuple[float, ...]  # seconds at which it hits a frame edge, sorted

    @property
    def sounding(self) -> bool:
        return self.label >= 0


# ---------------------------------------------------------------------------------------------
# Classes and segments
# ---------------------------------------------------------------------------------------------


def segment_classes(cfg: StreamConfig, segment: int) -> list[int]:
    """Active classes of a segment: consecutive blocks of classes, wrapping around."""
    start = segment * cfg.classes_per_segment
    return [(start + i) % cfg.num_classes for i in range(cfg.classes_per_segment)]


def segment_style(cfg: StreamConfig, segment: int) -> SegmentStyle:
    """The classes, background style and noise levels of a segment."""
    if not 0 <= segment < cfg.num_segments:
        raise ValueError(f"segment {segment} outside [0, {cfg.num_segments})")
    return SegmentStyle(
        classes=tuple(segment_classes(cfg, segment)),
        background=BACKGROUNDS[segment % len(BACKGROUNDS)],
        video_noise=cfg.video_noise[segment % len(cfg.video_noise)],
        snr_db=cfg.snr_db[segment % len(cfg.snr_db)],
    )


def class_pitch(cfg: StreamConfig, label: int) -> float:
    """Fundamental frequency (Hz) of a class: `pitch_step` semitones per class."""
    return cfg.base_pitch * 2.0 ** (label * cfg.pitch_step / 12.0)


def class_colour(cfg: StreamConfig, label: int) -> np.ndarray:
    """(3,) float32 RGB of a class: evenly spaced, saturated hues."""
    rgb = colorsys.hsv_to_rgb(label / cfg.num_classes, 0.9, 0.95)
    return np.array(rgb, dtype=np.float32) * 255.0


def class_shape(label: int) -> str:
    """Shape name of a class."""
    return SHAPES[label % len(SHAPES)]


def class_timbre(label: int) -> tuple[float, ...]:
    """Harmonic amplitudes of a class's sound (fundamental first)."""
    return TIMBRES[label % len(TIMBRES)]


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def _shape_field(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean inside-test on centred coordinates x, y in [-1, 1]."""
    r = np.hypot(x, y)
    ax, ay = np.abs(x), np.abs(y)
    fields = {
        "circle": lambda: r <= 0.95,
        "square": lambda: np.maximum(ax, ay) <= 0.8,
        "triangle": lambda: (y <= 0.8) & (y >= 2.0 * ax - 0.95),
        "cross": lambda: (np.minimum(ax, ay) <= 0.3) & (np.maximum(ax, ay) <= 0.95),
        "ring": lambda: (r <= 0.95) & (r >= 0.55),
        "diamond": lambda: ax + ay <= 1.0,
        "hourglass": lambda: (ax <= ay + 0.1) & (ay <= 0.9),
        "xcross": lambda: (np.abs(ax - ay) <= 0.35) & (r <= 1.2),
        "halfdisc": lambda: (r <= 0.95) & (y >= -0.1),
        "frame": lambda: (np.maximum(ax, ay) <= 0.9) & (np.maximum(ax, ay) >= 0.5),
    }
    return fields[shape]()


@functools.lru_cache(maxsize=256)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size, 1) float32 coverage in [0, 1], anti-aliased by 4x supersampling."""
    sub = 4
    coords = (np.arange(size * sub) + 0.5) / (size * sub) * 2.0 - 1.0
    inside = _shape_field(shape, coords[None, :], coords[:, None]).astype(np.float32)
    mask = inside.reshape(size, sub, size, sub).mean(axis=(1, 3))
    mask.setflags(write=False)
    return mask[:, :, None]


# ---------------------------------------------------------------------------------------------
# Motion
# ---------------------------------------------------------------------------------------------


def _reflect(u: np.ndarray, span: float) -> np.ndarray:
    """Fold an unbounded coordinate into [0, span] by mirror reflection (bouncing)."""
    phase = np.mod(u, 2.0 * span)
    return np.where(phase <= span, phase, 2.0 * span - phase)


def _axis_bounces(p0: float, v: float, span: float, seconds: float) -> list[float]:
    """Times in (0, seconds) at which p0 + v t crosses a multiple of span (an edge hit)."""
    if v == 0.0:
        return []
    end = p0 + v * seconds
    lo, hi = sorted((p0, end))
    ks = np.arange(np.floor(lo / span) + 1, np.ceil(hi / span))
    return [float((k * span - p0) / v) for k in ks]


def _random_track(rng: np.random.Generator, cfg: StreamConfig, label: int, size: int) -> Track:
    """A straight path at random speed and direction, bouncing off the frame edges."""
    span = float(cfg.size - size)
    p0 = rng.uniform(0.0, span, size=2)
    speed = rng.uniform(*cfg.speed) * cfg.size
    angle = rng.uniform(np.radians(20), np.radians(70)) + rng.integers(4) * np.pi / 2
    v = speed * np.array([np.cos(angle), np.sin(angle)])
    times = np.arange(cfg.num_frames) / cfg.fps
    positions = _reflect(p0[None, :] + times[:, None] * v[None, :], span)
    bounces = [t for axis in range(2) for t in _axis_bounces(p0[axis], v[axis], span, cfg.seconds)]
    return Track(label, size, np.rint(positions).astype(np.int64), tuple(sorted(bounces)))


def _spec_rngs(spec: ClipSpec) -> dict[str, np.random.Generator]:
    """Independent generators for motion, video and audio, all fixed by the spec."""
    second = 0 if spec.label2 is None else spec.label2 + 1
    root = np.random.SeedSequence([spec.seed, spec.segment, spec.label, second])
    names = ("motion", "video", "audio")
    return {n: np.random.default_rng(s) for n, s in zip(names, root.spawn(3), strict=True)}


def clip_tracks(spec: ClipSpec, cfg: StreamConfig) -> list[Track]:
    """The objects of a clip: sounding objects first, then the distractor (label -1) if any."""
    rng = _spec_rngs(spec)["motion"]
    side = cfg.object_frac * cfg.size
    labels = [spec.label] + ([] if spec.label2 is None else [spec.label2])
    tracks = [_random_track(rng, cfg, c, round(side * rng.uniform(0.9, 1.1))) for c in labels]
    if rng.random() < cfg.distractor_prob:
        tracks.append(_random_track(rng, cfg, -1, round(side * rng.uniform(0.6, 0.8))))
    return tracks


# ---------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------


def _muted_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) float32 low-saturation mid-brightness colours, so objects stand out."""
    hsv = np.stack([rng.random(n), rng.uniform(0.1, 0.35, n), rng.uniform(0.3, 0.75, n)], axis=1)
    return np.array([colorsys.hsv_to_rgb(*c) for c in hsv], dtype=np.float32) * 255.0


def _gradient(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    along = x * np.cos(angle := rng.uniform(0.0, np.pi)) + y * np.sin(angle)
    return (along - along.min()) / (along.max() - along.min())


def _stripes(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    along = x * np.cos(angle := rng.uniform(0.0, np.pi)) + y * np.sin(angle)
    return 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4.0, 10.0) * along)


def _checker(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cells = int(rng.integers(4, 10))
    return (((x * cells).astype(int) + (y * cells).astype(int)) % 2).astype(np.float32)


def _blobs(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of a 6 x 6 grid of random values: soft blotches."""
    coarse = rng.random((6, 6)).astype(np.float32)
    idx = x[0] * 5.0
    lo = np.minimum(idx.astype(int), 4)
    w = idx - lo
    rows = coarse[lo] * (1 - w[:, None]) + coarse[lo + 1] * w[:, None]
    return rows[:, lo] * (1 - w[None, :]) + rows[:, lo + 1] * w[None, :]


TEXTURES = {"gradient": _gradient, "stripes": _stripes, "checker": _checker, "blobs": _blobs}


def _texture(rng: np.random.Generator, style: str, size: int) -> np.ndarray:
    """(size, size) float32 blend weights in [0, 1] for a background style."""
    if style not in TEXTURES:
        raise ValueError(f"unknown background style {style!r}")
    grid = np.arange(size, dtype=np.float32) / size
    x, y = np.broadcast_arrays(grid[None, :], grid[:, None])
    return TEXTURES[style](rng, x, y).astype(np.float32)


def render_background(rng: np.random.Generator, style: str, size: int) -> np.ndarray:
    """(size, size, 3) float32 background: a texture blending two muted colours."""
    a, b = _muted_colours(rng, 2)
    weight = _texture(rng, style, size)[:, :, None]
    return a * (1.0 - weight) + b * weight


def _paste(frame: np.ndarray, mask: np.ndarray, colour: np.ndarray, x: int, y: int) -> None:
    """Blend a (s, s, 1) mask of one colour into frame (H, W, 3) at top-left (x, y), in place."""
    s = mask.shape[0]
    patch = frame[y : y + s, x : x + s]
    patch += mask * (colour - patch)


def _track_colour(cfg: StreamConfig, track: Track, rng: np.random.Generator) -> np.ndarray:
    """(3,) float32 colour: the class hue with slight brightness jitter; grey for distractors."""
    if not track.sounding:
        return np.full(3, rng.uniform(90.0, 200.0), dtype=np.float32)
    return class_colour(cfg, track.label) * np.float32(rng.uniform(0.85, 1.05))


def _track_mask(track: Track, rng: np.random.Generator) -> np.ndarray:
    """(s, s, 1) coverage mask: the class shape, or a random shape for a distractor."""
    shape = class_shape(track.label) if track.sounding else SHAPES[rng.integers(len(SHAPES))]
    return shape_mask(shape, track.size)


def _luma_noise(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """(*shape, 1) float32 grey pixel noise with the given std; uniform, which is fast to draw."""
    raw = rng.integers(0, 256, size=(*shape, 1), dtype=np.uint8).astype(np.float32)
    return (raw - np.float32(127.5)) * np.float32(std * np.sqrt(3.0) / 128.0)


def render_video(spec: ClipSpec, cfg: StreamConfig, tracks: list[Track]) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: background, objects along their tracks, pixel noise."""
    rng = _spec_rngs(spec)["video"]
    style = segment_style(cfg, spec.segment)
    frames = np.repeat(render_background(rng, style.background, cfg.size)[None], cfg.num_frames, 0)
    for track in tracks[::-1]:  # sounding object last, so it is drawn on top
        mask, colour = _track_mask(track, rng), _track_colour(cfg, track, rng)
        for frame, (x, y) in zip(frames, track.positions, strict=True):
            _paste(frame, mask, colour, int(x), int(y))
    frames += _luma_noise(rng, frames.shape[:3], style.video_noise)
    return np.clip(frames, 0.0, 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


def bounce_envelope(
    bounces: tuple[float, ...], num_samples: int, sample_rate: int, floor: float = 0.2
) -> np.ndarray:
    """(N,) float32 amplitude: a quiet floor plus a 5 ms attack, 150 ms decay at each bounce."""
    env = np.full(num_samples, floor, dtype=np.float32)
    attack, decay = 0.005 * sample_rate, 0.15 * sample_rate
    length = int(6 * decay)
    ramp = np.arange(length, dtype=np.float32)
    shape = np.where(ramp < attack, ramp / attack, np.exp(-(ramp - attack) / decay))
    for t in bounces:
        start = int(round(t * sample_rate))
        seg = env[start : start + length]
        seg += shape[: len(seg)] * (1.0 - floor)
    fade = min(num_samples, int(0.01 * sample_rate))
    env[:fade] *= np.linspace(0.0, 1.0, fade, dtype=np.float32)
    return env


def _tone(rng: np.random.Generator, cfg: StreamConfig, label: int, times: np.ndarray) -> np.ndarray:
    """(N,) float32 harmonic tone of a class: jittered pitch, random partial phases."""
    f0 = class_pitch(cfg, label) * (1.0 + rng.uniform(-cfg.pitch_jitter, cfg.pitch_jitter))
    wave = np.zeros_like(times)
    for k, amp in enumerate(class_timbre(label), start=1):
        if amp > 0 and k * f0 < 0.45 * cfg.sample_rate:
            wave += amp * np.sin(2 * np.pi * k * f0 * times + rng.uniform(0, 2 * np.pi))
    return wave / np.abs(wave).max()


def _add_noise(rng: np.random.Generator, signal: np.ndarray, snr_db: float) -> np.ndarray:
    """Add white noise at a given SNR (dB) relative to the signal's mean power."""
    noise_power = np.mean(signal**2) / 10.0 ** (snr_db / 10.0)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    return signal + noise * np.float32(np.sqrt(noise_power))


def render_audio(spec: ClipSpec, cfg: StreamConfig, tracks: list[Track]) -> np.ndarray:
    """(N,) float32 mono audio in [-1, 1]: each sounding object's tone, onsets at its bounces."""
    rng = _spec_rngs(spec)["audio"]
    times = np.arange(cfg.num_samples, dtype=np.float32) / cfg.sample_rate
    mix = np.zeros(cfg.num_samples, dtype=np.float32)
    for track in (t for t in tracks if t.sounding):
        env = bounce_envelope(track.bounce_times, cfg.num_samples, cfg.sample_rate)
        mix += _tone(rng, cfg, track.label, times) * env
    noisy = _add_noise(rng, mix, segment_style(cfg, spec.segment).snr_db)
    peak = rng.uniform(0.4, 0.85)  # loudness varies per clip
    return (noisy * (peak / np.abs(noisy).max())).astype(np.float32)


def render_clip(spec: ClipSpec, cfg: StreamConfig) -> tuple[np.ndarray, np.ndarray]:
    """Raw media of a clip: frames (T, H, W, 3) uint8 and audio (N,) float32."""
    tracks = clip_tracks(spec, cfg)
    return render_video(spec, cfg, tracks), render_audio(spec, cfg, tracks)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@functools.cache
def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return False
    return True


def _add_video_stream(
    out: av.container.OutputContainer, codec: str, fps: int, size: tuple[int, int], crf: int
) -> av.video.stream.VideoStream:
    """A yuv420p video stream, single-threaded so the bytes do not depend on the machine.

    zerolatency (no B-frames, no lookahead) halves x264's time on these short, noisy clips."""
    name = codec if _has_encoder(codec) else "mpeg4"
    stream = out.add_stream(name, rate=fps)
    assert isinstance(stream, av.video.stream.VideoStream)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    if name == "libx264":
        stream.options = {"preset": "veryfast", "tune": "zerolatency", "crf": str(crf)}
    else:
        stream.bit_rate = MPEG4_BIT_RATE
    stream.codec_context.thread_count = 1
    return stream


def _mux_video(
    out: av.container.OutputContainer, stream: av.video.stream.VideoStream, frames: np.ndarray
) -> None:
    """Encode and mux frames (T, H, W, 3) uint8 at pts 0, 1, ... (time base 1/fps)."""
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = i
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def _add_audio_stream(
    out: av.container.OutputContainer, rate: int, bit_rate: int
) -> av.audio.stream.AudioStream:
    """A mono AAC stream at the audio's own sample rate."""
    stream = out.add_stream("aac", rate=rate, layout="mono")
    stream.bit_rate = bit_rate
    stream.options = {"aac_coder": "fast"}  # twice as fast as the default two-loop search
    return stream


def _mux_audio(
    out: av.container.OutputContainer, stream: av.audio.stream.AudioStream, audio: np.ndarray
) -> None:
    """Encode and mux audio (N,) float32 as one frame; the encoder splits it into AAC frames."""
    frame = av.AudioFrame.from_ndarray(audio[None, :], format="fltp", layout="mono")
    frame.sample_rate, frame.pts = stream.rate, 0
    out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def encode_mp4(
    frames: np.ndarray,
    audio: np.ndarray,
    fps: int,
    sample_rate: int,
    codec: str = "libx264",
    crf: int = 26,
    audio_bit_rate: int = 48_000,
) -> bytes:
    """MP4 bytes (H.264 or MPEG-4 Part 2 yuv420p + AAC mono) of frames (T, H, W, 3) uint8 and
    audio (N,) float32 in [-1, 1]. Falls back to mpeg4 when `codec` is not available."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        video = _add_video_stream(out, codec, fps, frames.shape[1:3], crf)
        sound = _add_audio_stream(out, sample_rate, audio_bit_rate)
        _mux_video(out, video, frames)
        _mux_audio(out, sound, np.ascontiguousarray(audio, dtype=np.float32))
    return buf.getvalue()


def make_clip(spec: ClipSpec, cfg: StreamConfig) -> bytes:
    """MP4 bytes of a clip, identical for identical (spec, cfg)."""
    frames, audio = render_clip(spec, cfg)
    return encode_mp4(
        frames, audio, cfg.fps, cfg.sample_rate, cfg.codec, cfg.crf, cfg.audio_bit_rate
    )


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------


def segment_specs(
    cfg: StreamConfig,
    segment: int,
    n: int,
    seed: int,
    split: Literal["train", "heldout"] = "train",
) -> list[ClipSpec]:
    """n clip specs of a segment, labels balanced over its classes and shuffled.

    Train seeds are even and held-out seeds odd, so the two splits never share a clip."""
    style = segment_style(cfg, segment)
    parity = SPLITS.index(split)
    rng = np.random.default_rng([seed, segment, parity])
    labels = rng.permutation(np.resize(np.array(style.classes), n))
    seeds = rng.choice(2**62, size=n, replace=False) * 2 + parity
    return [
        ClipSpec(segment, int(c), int(s), _second_label(rng, cfg, style, int(c)))
        for c, s in zip(labels, seeds, strict=True)
    ]


def _second_label(
    rng: np.random.Generator, cfg: StreamConfig, style: SegmentStyle, label: int
) -> int | None:
    """Another active class with probability `second_object_prob`, else None."""
    others = [c for c in style.classes if c != label]
    if not others or rng.random() >= cfg.second_object_prob:
        return None
    return int(rng.choice(others))


def drifting_stream(
    cfg: StreamConfig, clips_per_segment: int, seed: int = 0
) -> Iterator[tuple[ClipSpec, bytes]]:
    """(spec, MP4 bytes) for every training clip, segment after segment (the drift)."""
    for segment in range(cfg.num_segments):
        for spec in segment_specs(cfg, segment, clips_per_segment, seed, "train"):
            yield spec, make_clip(spec, cfg)
