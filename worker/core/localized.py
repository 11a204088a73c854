"""Synthetic tasks where localized audio-video correspondence is learnable and transfers.

Each scene shows one sounding object and `num_distractors` silent distractor objects (each of
another shape and a clearly different hue, comparable size, placed without overlap) on a
textured background. Only the sounding object is tied to the audio, by a rule that is
factor-wise and the same in every task, so an alignment module (AVM) learned on the
pretraining split transfers to tasks it has not seen:

- shape <-> timbre: each shape of `LOCALIZED_SHAPES` has its own set of harmonic amplitudes;
- hue <-> pitch: the hue h in [0, hue_span) sets the fundamental, log-linearly from
  `pitch_low` to `pitch_high` (two octaves by default). The hue range stops short of the whole
  circle (0.8: red to magenta) so the two ends of the pitch range never share a colour;
- loudness <-> brightness (temporal synchrony): the sound has 2-4 events (a short attack, an
  exponential decay) over a quiet floor, and the object's brightness (HSV value) follows the
  same envelope frame by frame. Distractors pulse at their own times, kept apart from the
  sounding object's events, and make no sound.

Drift: task k draws the sounding object's hue from band k (the hue range cut into `num_tasks`
equal bands, with the matching pitch band) and its shape from a window of `shapes_per_task`
shapes, over a task-specific background style, pixel noise and audio SNR. The pretraining
split (task -1) draws hues from the whole range and all shapes, on its own background style
("rings"), so the shared rule is learned over the full ranges and every task is a narrower,
drifted slice of it: new combinations, never new pairings.

Distractors take any hue (at least `hue_gap` from the others), another of the scene's shapes
and the same size range, so no colour, shape or size tells alone which object sounds: only the
audio does. Objects are 0.36-0.42 of the frame side, so at the `tiny` preset (96 px frames,
16 px patches) the sounding object covers >= 2 x 2 tokens by 25% in ~99% of scenes (a
hollow or diagonal shape at an unlucky offset may cover 3). They do not move: brightness
carries the timing, and the token masks hold for every frame.
Ground truth at the model's token grid (`scene_masks`) follows the decoder's timing contract
(`worker.core.media.example_window`): video tokens covered >= `cover` by the sounding object
or by a distractor, and audio tokens (time-major, t * F' + f) whose time column lies in a loud
event of the sounding object and whose mel row holds one of its partials.

Conventions as in `worker/core/synthetic.py`: frames (T, H, W, 3) uint8 RGB, audio (N,) float32
mono in [-1, 1], positions are top-left (x, y) pixels, times in seconds. Everything about a clip
follows from its `SceneSpec` and the `LocalizedConfig`.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worker.core.fbank import mel_scale
from worker.core.media import MediaConfig, example_window
from worker.core.synthetic import (
    BACKGROUNDS,
    TEXTURES,
    TIMBRES,
    ClipTiming,
    _add_noise,
    _luma_noise,
    _muted_colours,
    _paste,
    encode_mp4,
    shape_mask,
)

# Shapes that fill enough of their box to cover 2 x 2 tokens by 25% nearly anywhere (triangle,
# cross, diamond, halfdisc and hourglass often do not), one timbre each.
LOCALIZED_SHAPES = ("circle", "square", "ring", "xcross", "frame")
LOCALIZED_TIMBRES = TIMBRES  # harmonic amplitudes, fundamental first and loudest
PRETRAIN_BACKGROUND = "rings"  # a texture no task uses
SPLITS = ("train", "heldout")


# ---------------------------------------------------------------------------------------------
# Configuration and scene identity
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalizedConfig(ClipTiming):
    """The scenes, the rule's ranges, the drift and the encoding of the localized tasks."""

    seconds: float = 3.0  # clip length; covers the `tiny` preset's 2.56 s of audio
    fps: int = 10  # video frame rate
    size: int = 128  # frame height and width in pixels (even, for yuv420p)
    sample_rate: int = 16000  # audio sample rate (Hz), mono
    num_tasks: int = 4  # tasks after pretraining; each owns one hue band
    shapes_per_task: int = 3  # sounding shapes of one task (a window over LOCALIZED_SHAPES)
    num_distractors: int = 2  # silent objects per scene
    object_frac: tuple[float, float] = (0.36, 0.42)  # object side / frame side (all objects)
    hue_span: float = 0.8  # hues lie in [0, hue_span): red to magenta, the ends look apart
    # hues (and so pitches) come in this many levels, evenly over hue_span (0: continuous).
    # Measured with continuous hues: an AVM fed only the object's tokens fits its training
    # pairs (0.88) but stays at chance on held-out scenes: it memorises clips instead of
    # learning a continuous hue ~ pitch band; levels make the rule categorical, as sounds
    # and their sources are in real video (docs/localized.md).
    hue_levels: int = 16
    hue_gap: float = 0.12  # least hue distance (on the circle) between any two objects
    saturation: float = 0.9  # HSV saturation of every object
    dim: float = 0.35  # HSV value of an object at its quiet floor; 1.0 at an event's peak
    pitch_low: float = 200.0  # fundamental (Hz) of hue 0
    pitch_high: float = 800.0  # fundamental (Hz) at hue_span (log-linear in between)
    events: tuple[int, int] = (2, 4)  # loud events per clip, inclusive range
    event_gap: float = 0.5  # least time (s) between two events of one object
    distractor_gap: float = 0.25  # least time (s) from a distractor's event to the sound's
    attack: float = 0.02  # event rise time (s)
    decay: float = 0.3  # event exponential decay constant (s)
    floor: float = 0.1  # envelope between events (amplitude and brightness), in [0, 1)
    video_noise: tuple[float, ...] = (3.0, 6.0, 9.0, 4.5)  # pixel noise std per task (cycled)
    snr_db: tuple[float, ...] = (20.0, 12.0, 8.0, 15.0)  # audio SNR per task (cycled)
    pretrain_noise: float = 4.0  # pixel noise std of the pretraining split
    pretrain_snr_db: float = 15.0  # audio SNR of the pretraining split
    loud: float = 0.5  # an audio time column is "loud" when its mean event level reaches this
    partial_min: float = 0.2  # partials this loud (relative to the fundamental) mark mel rows
    cover: float = 0.25  # a video token belongs to an object covering this fraction of it
    codec: str = "libx264"  # video encoder; mpeg4 if libx264 is missing
    crf: int = 23  # libx264 constant rate factor (lower is better; 23 keeps hues sharp)
    audio_bit_rate: int = 48_000  # AAC bit rate

    def __post_init__(self) -> None:
        if self.size % 2 or self.size < 32:
            raise ValueError(f"size must be even and >= 32, got {self.size}")
        shapes = len(LOCALIZED_SHAPES)
        if self.num_tasks < 1 or not 1 <= self.shapes_per_task <= shapes:
            raise ValueError(f"need num_tasks >= 1 and 1 <= shapes_per_task <= {shapes}")
        if not 0 <= self.num_distractors < shapes:
            raise ValueError(f"num_distractors must lie in [0, {shapes}): one shape per object")
        if self.hue_levels < 0 or self.hue_levels % self.num_tasks:
            raise ValueError("hue_levels must be 0 or a multiple of num_tasks (one band each)")
        if not 0 < self.hue_span <= 1 or not 0 <= self.floor < 1:
            raise ValueError("need 0 < hue_span <= 1 and 0 <= floor < 1")
        if self.pitch_high * max(map(len, LOCALIZED_TIMBRES)) >= 0.45 * self.sample_rate:
            raise ValueError(f"pitch_high {self.pitch_high} Hz: partials pass 0.45 x Nyquist")


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to regenerate one scene exactly (with the LocalizedConfig)."""

    task: int  # 0..num_tasks-1, or -1 for the pretraining split
    seed: int  # per-scene randomness (>= 0); its low two bits encode split and pretraining
    split: str = "train"  # "train" or "heldout"

    def __post_init__(self) -> None:
        if self.split not in SPLITS or self.task < -1 or self.seed < 0:
            raise ValueError(f"bad scene spec {self}")

    @property
    def clip_id(self) -> str:
        """A readable, unique name: task, split and seed."""
        task = "pre" if self.task < 0 else f"t{self.task}"
        return f"{task}-{self.split}-{self.seed:016x}"


@dataclass(frozen=True)
class TaskStyle:
    """What a task draws from: hue band, sounding shapes, background and noise levels."""

    hue_band: tuple[float, float]  # [low, high) of the sounding object's hue
    shapes: tuple[str, ...]  # sounding object shapes
    background: str  # texture style
    video_noise: float  # pixel noise std (0-255 scale)
    snr_db: float  # audio signal-to-noise ratio


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; static, so its box is the same in every frame."""

    hue: float  # HSV hue in [0, hue_span)
    shape: str  # a name from LOCALIZED_SHAPES
    size: int  # side of its square box in pixels
    x: int  # top-left corner
    y: int
    events: tuple[float, ...]  # times (s) of its loud events (its brightness pulses), sorted


@dataclass
class SceneMasks:
    """Ground-truth token masks of one clip at the model's grid (True: belongs)."""

    object_v: Tensor  # (Lv,) bool: video tokens covered >= cover by the sounding object
    distractor_v: Tensor  # (Lv,) bool: video tokens covered >= cover by any distractor
    object_a: Tensor  # (La,) bool: audio tokens with the sounding object's loud partials


# ---------------------------------------------------------------------------------------------
# The rule and the tasks
# ---------------------------------------------------------------------------------------------


def hue_to_pitch(cfg: LocalizedConfig, hue: float) -> float:
    """Fundamental (Hz) of a hue in [0, hue_span): log-linear from pitch_low to pitch_high."""
    return cfg.pitch_low * (cfg.pitch_high / cfg.pitch_low) ** (hue / cfg.hue_span)


def snap_hue(cfg: LocalizedConfig, hue: float) -> float:
    """The centre of the hue level holding ``hue`` (unchanged when hue_levels is 0)."""
    if cfg.hue_levels <= 0:
        return hue
    width = cfg.hue_span / cfg.hue_levels
    level = min(cfg.hue_levels - 1, max(0, math.floor((hue % 1.0) / width)))
    return (level + 0.5) * width


def pitch_to_hue(cfg: LocalizedConfig, pitch_hz: float) -> float:
    """The inverse of `hue_to_pitch`."""
    fraction = math.log(pitch_hz / cfg.pitch_low) / math.log(cfg.pitch_high / cfg.pitch_low)
    return cfg.hue_span * fraction


def shape_timbre(shape: str) -> int:
    """Index into LOCALIZED_TIMBRES of a sounding shape's timbre."""
    return LOCALIZED_SHAPES.index(shape)


def task_style(cfg: LocalizedConfig, task: int) -> TaskStyle:
    """The slice of the rule's ranges a task draws from; task -1 is the full pretraining range."""
    if task == -1:
        full, noise, snr = (0.0, cfg.hue_span), cfg.pretrain_noise, cfg.pretrain_snr_db
        return TaskStyle(full, LOCALIZED_SHAPES, PRETRAIN_BACKGROUND, noise, snr)
    if not 0 <= task < cfg.num_tasks:
        raise ValueError(f"task {task} outside [-1, {cfg.num_tasks})")
    width = cfg.hue_span / cfg.num_tasks
    first = task * len(LOCALIZED_SHAPES) // cfg.num_tasks
    shapes = tuple(
        LOCALIZED_SHAPES[(first + j) % len(LOCALIZED_SHAPES)] for j in range(cfg.shapes_per_task)
    )
    return TaskStyle(
        hue_band=(task * width, (task + 1) * width),
        shapes=shapes,
        background=BACKGROUNDS[task % len(BACKGROUNDS)],
        video_noise=cfg.video_noise[task % len(cfg.video_noise)],
        snr_db=cfg.snr_db[task % len(cfg.snr_db)],
    )


def task_names(cfg: LocalizedConfig) -> list[str]:
    """A readable name per task: hue band, sounding shapes and background."""
    names = []
    for task in range(cfg.num_tasks):
        style = task_style(cfg, task)
        lo, hi = style.hue_band
        shapes = "/".join(style.shapes)
        names.append(f"hue {lo:.2f}-{hi:.2f}, {shapes}, {style.background}")
    return names


# ---------------------------------------------------------------------------------------------
# Layout: objects and event times
# ---------------------------------------------------------------------------------------------


def _spec_rngs(spec: SceneSpec) -> dict[str, np.random.Generator]:
    """Independent generators for layout, video and audio, all fixed by the spec."""
    root = np.random.SeedSequence([spec.seed, spec.task + 1, SPLITS.index(spec.split)])
    names = ("layout", "video", "audio")
    return {n: np.random.default_rng(s) for n, s in zip(names, root.spawn(3), strict=True)}


def _hue_distance(a: float, b: float) -> float:
    """Distance of two hues on the colour circle, in [0, 0.5]."""
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def _distractor_hue(rng: np.random.Generator, cfg: LocalizedConfig, taken: list[float]) -> float:
    """A hue in [0, hue_span) at least hue_gap from every taken hue (the farthest of 64 draws
    if none is)."""
    draws = rng.uniform(0.0, cfg.hue_span, 64)
    gaps = np.array([min(_hue_distance(h, t) for t in taken) for h in draws])
    ok = np.flatnonzero(gaps >= cfg.hue_gap)
    return float(draws[ok[0]] if ok.size else draws[gaps.argmax()])


def _event_times(
    rng: np.random.Generator, cfg: LocalizedConfig, count: int, avoid: tuple[float, ...] = ()
) -> tuple[float, ...]:
    """Up to ``count`` sorted times, event_gap apart and distractor_gap from ``avoid``.

    Candidates lie on a 10 ms grid, leaving the decay room before the clip's end."""
    grid = np.arange(0.1, cfg.seconds - cfg.decay, 0.01)
    if avoid:
        far = np.min(np.abs(grid[:, None] - np.array(avoid)[None, :]), axis=1)
        grid = grid[far >= cfg.distractor_gap] if (far >= cfg.distractor_gap).any() else grid
    chosen: list[float] = []
    for t in rng.permutation(grid):
        if len(chosen) < count and all(abs(t - c) >= cfg.event_gap for c in chosen):
            chosen.append(float(round(t, 2)))
    return tuple(sorted(chosen))


def _place(
    rng: np.random.Generator, cfg: LocalizedConfig, sizes: list[int]
) -> list[tuple[int, int]]:
    """Top-left corners for boxes of ``sizes``, 2 px apart: each box uniform over the places
    the earlier ones leave free (20 tries), else one box per cell of a jittered grid."""
    for _ in range(20):
        corners = _free_layout(rng, cfg, sizes)
        if corners is not None:
            return corners
    return _grid_layout(rng, cfg, sizes)


def _free_layout(
    rng: np.random.Generator, cfg: LocalizedConfig, sizes: list[int]
) -> list[tuple[int, int]] | None:
    """Boxes placed one after another, each uniformly where it fits; None when one cannot."""
    placed: list[tuple[int, int, int]] = []
    for size in sizes:
        corner = np.arange(cfg.size - size + 1)
        free = np.ones((corner.size, corner.size), dtype=bool)  # (y, x)
        for bx, by, bs in placed:
            apart_x = (corner + size + 2 <= bx) | (bx + bs + 2 <= corner)
            apart_y = (corner + size + 2 <= by) | (by + bs + 2 <= corner)
            free &= apart_y[:, None] | apart_x[None, :]
        options = np.flatnonzero(free)
        if options.size == 0:
            return None
        y, x = divmod(int(rng.choice(options)), corner.size)
        placed.append((x, y, size))
    return [(x, y) for x, y, _ in placed]


def _grid_layout(
    rng: np.random.Generator, cfg: LocalizedConfig, sizes: list[int]
) -> list[tuple[int, int]]:
    """One box per cell of a k x k grid (cells in random order), jittered inside its cell."""
    k = math.ceil(math.sqrt(len(sizes)))
    cell = cfg.size // k
    corners = []
    for size, index in zip(sizes, rng.permutation(k * k), strict=False):
        row, col = divmod(int(index), k)
        slack = max(
            0, min(cell - size - 2, cfg.size - size - col * cell, cfg.size - size - row * cell)
        )
        x, y = (col * cell, row * cell) + rng.integers(0, slack + 1, size=2)
        corners.append((int(x), int(y)))
    return corners


def scene_objects(spec: SceneSpec, cfg: LocalizedConfig) -> list[SceneObject]:
    """The objects of a scene: the sounding object first, then the distractors."""
    rng = _spec_rngs(spec)["layout"]
    style = task_style(cfg, spec.task)
    hues = [snap_hue(cfg, float(rng.uniform(*style.hue_band)))]
    shapes = [str(rng.choice(style.shapes))]
    for _ in range(cfg.num_distractors):
        hues.append(snap_hue(cfg, _distractor_hue(rng, cfg, hues)))
        shapes.append(str(rng.choice([s for s in LOCALIZED_SHAPES if s not in shapes])))
    sizes = [round(cfg.size * rng.uniform(*cfg.object_frac)) for _ in hues]
    corners = _place(rng, cfg, sizes)
    sound = _event_times(rng, cfg, int(rng.integers(cfg.events[0], cfg.events[1] + 1)))
    events = [sound] + [
        _event_times(rng, cfg, int(rng.integers(1, cfg.events[1] + 1)), sound)
        for _ in range(cfg.num_distractors)
    ]
    parts = zip(hues, shapes, sizes, corners, events, strict=True)
    return [SceneObject(h, s, z, x, y, e) for h, s, z, (x, y), e in parts]


def scene_factors(spec: SceneSpec, cfg: LocalizedConfig) -> dict[str, Any]:
    """The generative factors of a scene (for tests and reports)."""
    objects = scene_objects(spec, cfg)
    sounding = objects[0]
    return {
        "hue": sounding.hue,
        "pitch_hz": hue_to_pitch(cfg, sounding.hue),
        "shape": sounding.shape,
        "timbre": shape_timbre(sounding.shape),
        "events": sounding.events,
        "box": (sounding.x, sounding.y, sounding.size),
        "distractors": [
            {"hue": o.hue, "shape": o.shape, "box": (o.x, o.y, o.size), "events": o.events}
            for o in objects[1:]
        ],
    }


def envelope(cfg: LocalizedConfig, events: tuple[float, ...], times: np.ndarray) -> np.ndarray:
    """Event level in [0, 1] at ``times`` (s): a linear attack, then exponential decay."""
    d = np.asarray(times, dtype=np.float64)[:, None] - np.array(events, dtype=np.float64)[None]
    rise = np.clip(d / cfg.attack, 0.0, 1.0)
    fall = np.exp(-np.maximum(d - cfg.attack, 0.0) / cfg.decay)
    level = np.where(d < 0, 0.0, np.minimum(rise, fall)).sum(axis=1)
    return np.minimum(level, 1.0).astype(np.float32)


def loudness(cfg: LocalizedConfig, events: tuple[float, ...], times: np.ndarray) -> np.ndarray:
    """Amplitude (audio) and brightness (video) envelope: the floor plus the event level."""
    return np.float32(cfg.floor) + np.float32(1 - cfg.floor) * envelope(cfg, events, times)


# ---------------------------------------------------------------------------------------------
# Rendering and encoding
# ---------------------------------------------------------------------------------------------


def _rings(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Concentric rings around a random centre: the pretraining texture."""
    r = np.hypot(x - rng.uniform(0.2, 0.8), y - rng.uniform(0.2, 0.8))
    return 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3.0, 7.0) * r)


def _background(rng: np.random.Generator, style: str, size: int) -> np.ndarray:
    """(size, size, 3) float32: a texture (synthetic's, or rings) blending two muted colours."""
    texture = {**TEXTURES, PRETRAIN_BACKGROUND: _rings}[style]
    grid = np.arange(size, dtype=np.float32) / size
    x, y = np.broadcast_arrays(grid[None, :], grid[:, None])
    a, b = _muted_colours(rng, 2)
    weight = texture(rng, x, y).astype(np.float32)[:, :, None]
    return a * (1.0 - weight) + b * weight


def _object_colours(cfg: LocalizedConfig, obj: SceneObject, times: np.ndarray) -> np.ndarray:
    """(T, 3) float32 RGB (0-255) per frame: the object's hue, brightness on its envelope."""
    value = cfg.dim + (1.0 - cfg.dim) * envelope(cfg, obj.events, times)
    rgb = [colorsys.hsv_to_rgb(obj.hue, cfg.saturation, float(v)) for v in value]
    return np.array(rgb, dtype=np.float32) * 255.0


def render_video(spec: SceneSpec, cfg: LocalizedConfig, objects: list[SceneObject]) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: background, objects (sounding on top), pixel noise."""
    rng = _spec_rngs(spec)["video"]
    style = task_style(cfg, spec.task)
    frames = np.repeat(_background(rng, style.background, cfg.size)[None], cfg.num_frames, 0)
    times = np.arange(cfg.num_frames) / cfg.fps
    for obj in objects[::-1]:
        mask = shape_mask(obj.shape, obj.size)
        for frame, colour in zip(frames, _object_colours(cfg, obj, times), strict=True):
            _paste(frame, mask, colour, obj.x, obj.y)
    frames += _luma_noise(rng, frames.shape[:3], style.video_noise)
    return np.clip(frames, 0.0, 255.0).astype(np.uint8)


def _tone(rng: np.random.Generator, pitch: float, timbre: int, times: np.ndarray) -> np.ndarray:
    """(N,) float32 harmonic tone at ``pitch`` Hz, random partial phases, peak 1."""
    wave = np.zeros_like(times)
    for k, amp in enumerate(LOCALIZED_TIMBRES[timbre], start=1):
        if amp > 0:
            wave += amp * np.sin(2 * np.pi * k * pitch * times + rng.uniform(0, 2 * np.pi))
    return wave / np.abs(wave).max()


def render_audio(spec: SceneSpec, cfg: LocalizedConfig, sounding: SceneObject) -> np.ndarray:
    """(N,) float32 in [-1, 1]: the sounding object's tone on its envelope, plus noise."""
    rng = _spec_rngs(spec)["audio"]
    times = np.arange(cfg.num_samples, dtype=np.float32) / cfg.sample_rate
    pitch = hue_to_pitch(cfg, sounding.hue)
    signal = _tone(rng, pitch, shape_timbre(sounding.shape), times)
    signal *= loudness(cfg, sounding.events, times)
    noisy = _add_noise(rng, signal, task_style(cfg, spec.task).snr_db)
    peak = rng.uniform(0.4, 0.85)  # loudness varies per clip
    return (noisy * (peak / np.abs(noisy).max())).astype(np.float32)


def render_scene(spec: SceneSpec, cfg: LocalizedConfig) -> tuple[np.ndarray, np.ndarray]:
    """Raw media of a scene: frames (T, H, W, 3) uint8 and audio (N,) float32."""
    objects = scene_objects(spec, cfg)
    return render_video(spec, cfg, objects), render_audio(spec, cfg, objects[0])


def make_scene_clip(spec: SceneSpec, cfg: LocalizedConfig) -> bytes:
    """MP4 bytes of a scene, identical for identical (spec, cfg)."""
    frames, audio = render_scene(spec, cfg)
    return encode_mp4(
        frames, audio, cfg.fps, cfg.sample_rate, cfg.codec, cfg.crf, cfg.audio_bit_rate
    )


# ---------------------------------------------------------------------------------------------
# Ground-truth token masks
# ---------------------------------------------------------------------------------------------


def _coverage(cfg: LocalizedConfig, objects: list[SceneObject]) -> list[np.ndarray]:
    """(H, W) float32 visible coverage of each object, the sounding one drawn on top."""
    above = np.zeros((cfg.size, cfg.size), dtype=np.float32)
    out = []
    for obj in objects:
        full = np.zeros_like(above)
        mask = shape_mask(obj.shape, obj.size)[:, :, 0]
        full[obj.y : obj.y + obj.size, obj.x : obj.x + obj.size] = mask
        out.append(full * (1.0 - above))
        above = np.maximum(above, full)
    return out


def _token_cover(coverage: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) mean of a square (S, S) coverage map over each token cell (exact area)."""
    repeat = grid // math.gcd(coverage.shape[0], grid)
    fine = np.repeat(np.repeat(coverage, repeat, axis=0), repeat, axis=1)
    cell = fine.shape[0] // grid
    return fine.reshape(grid, cell, grid, cell).mean(axis=(1, 3))


def _video_masks(
    cfg: LocalizedConfig, objects: list[SceneObject], media: MediaConfig, patch: int
) -> tuple[Tensor, Tensor]:
    """(Lv,) bool object and distractor tokens; objects are static, so every frame is alike."""
    grid = media.frame_size // patch
    cover = [_token_cover(c, grid) >= cfg.cover for c in _coverage(cfg, objects)]
    distractors = np.logical_or.reduce(cover[1:]) if len(cover) > 1 else np.zeros_like(cover[0])
    frame = [torch.from_numpy(np.ascontiguousarray(m)).reshape(-1) for m in (cover[0], distractors)]
    object_v, distractor_v = (m.repeat(media.num_frames) for m in frame)
    return object_v, distractor_v


def _mel_rows(
    cfg: LocalizedConfig, sounding: SceneObject, media: MediaConfig, patch: int
) -> Tensor:
    """(F',) bool: token rows holding a partial of the sounding object (Kaldi mel centres)."""
    timbre = LOCALIZED_TIMBRES[shape_timbre(sounding.shape)]
    pitch = hue_to_pitch(cfg, sounding.hue)
    freqs = [k * pitch for k, amp in enumerate(timbre, start=1) if amp >= cfg.partial_min]
    low, high = float(mel_scale(20.0)), float(mel_scale(media.sample_rate / 2))
    step = (high - low) / (media.mel_bins + 1)
    rows = torch.zeros(media.mel_bins // patch, dtype=torch.bool)
    for f in freqs:
        centre = round((float(mel_scale(f)) - low) / step) - 1
        rows[min(max(centre, 0), media.mel_bins - 1) // patch] = True
    return rows


def _loud_columns(
    cfg: LocalizedConfig, sounding: SceneObject, media: MediaConfig, patch: int
) -> Tensor:
    """(T',) bool: audio token columns whose mean event level reaches `loud`."""
    columns = media.audio_frames // patch
    start = example_window(cfg.seconds, media).start_s
    span = patch * 0.01  # fbank frames are 10 ms apart
    times = start + np.arange(columns * 100) * (span / 100)  # 100 samples per column
    level = envelope(cfg, sounding.events, times).reshape(columns, 100).mean(axis=1)
    inside = start + np.arange(columns) * span < cfg.seconds  # columns past the clip are silent
    return torch.from_numpy((level >= cfg.loud) & inside)


def scene_masks(
    spec: SceneSpec, cfg: LocalizedConfig, media: MediaConfig, patch: int
) -> SceneMasks:
    """Ground-truth token masks of a scene, decoded (eval mode) with ``media`` into tokens of
    ``patch`` pixels / fbank bins: see the module docstring."""
    if media.frame_size % patch or media.audio_frames % patch or media.mel_bins % patch:
        raise ValueError(f"patch {patch} does not divide the media's frame, time or mel size")
    objects = scene_objects(spec, cfg)
    object_v, distractor_v = _video_masks(cfg, objects, media, patch)
    cols = _loud_columns(cfg, objects[0], media, patch)
    rows = _mel_rows(cfg, objects[0], media, patch)
    return SceneMasks(object_v, distractor_v, (cols[:, None] & rows[None, :]).reshape(-1))


# ---------------------------------------------------------------------------------------------
# Splits and the stream
# ---------------------------------------------------------------------------------------------


def scene_specs(cfg: LocalizedConfig, task: int, n: int, seed: int, split: str) -> list[SceneSpec]:
    """n scene specs of a task (-1: pretraining) and split.

    Seeds are 4 r + 2 [pretraining] + [held out], so the splits and the pretraining scenes never
    share a seed."""
    task_style(cfg, task)  # validates the task
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    code = 2 * (task < 0) + SPLITS.index(split)
    rng = np.random.default_rng([seed, task + 1, code])
    seeds = rng.choice(2**60, size=n, replace=False) * 4 + code
    return [SceneSpec(task, int(s), split) for s in seeds]


def localized_stream(
    cfg: LocalizedConfig, clips_per_task: int, seed: int = 0
) -> Iterator[tuple[SceneSpec, bytes]]:
    """(spec, MP4 bytes) for every training clip of the tasks, task after task (the drift).

    The pretraining split is not part of the stream: draw it with ``scene_specs(cfg, -1, ...)``."""
    for task in range(cfg.num_tasks):
        for spec in scene_specs(cfg, task, clips_per_task, seed, "train"):
            yield spec, make_scene_clip(spec, cfg)
