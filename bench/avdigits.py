"""AV-Digits: real spoken digits paired with real handwritten digit images, as tensors.

Audio: the Asterisk prompt recordings of the digits 0-9 (Debian packages
``asterisk-core-sounds-{en,es,fr,it,ru}-gsm``, one speaker per language, 8 kHz GSM), decoded
with PyAV, resampled to 16 kHz and augmented (speed, pitch, noise, gain, onset) for volume.
Images: scikit-learn's ``load_digits()`` (1,797 real 8 x 8 handwritten digits), split by image
into pretrain / train / held-out sets, rendered into the video frames (scaled, rotated, moving,
coloured ink on a noisy background).

A clip pairs one utterance of digit d with one image of digit d; its label is d. Clips are
built directly as model inputs (fbank, uint8 RGB frames): no MP4 round trip. The recordings are
read from where the packages install them and never copied anywhere.

Held-out retrieval clips use held-out images and their own augmentation draws (seeds disjoint
from training). Each language has a single speaker and a single recording per digit, so a truly
unseen voice would also be an unseen language (unseen words): the held-out "voices" here are
unseen speed/pitch/noise renditions of the task languages' recordings.
"""

from __future__ import annotations

import colorsys
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from worker.core.clipset import ClipSet
from worker.core.media import MediaConfig, audio_features

logger = logging.getLogger(__name__)

SOUNDS_ROOT = Path("/usr/share/asterisk/sounds")
LANGUAGES = ("en", "es", "fr", "it", "ru")
DIGITS = tuple(range(10))
SPLITS = ("pretrain", "train", "heldout")


class MissingRecordings(RuntimeError):
    """Some digit recordings are not installed; the message says how to install them."""


def install_command(languages: tuple[str, ...]) -> str:
    """The apt command that installs the recordings of ``languages``."""
    packages = " ".join(f"asterisk-core-sounds-{lang}-gsm" for lang in languages)
    return f"apt-get update && apt-get install -y {packages}"


# ---------------------------------------------------------------------------------------------
# Recordings
# ---------------------------------------------------------------------------------------------


def find_recordings(
    languages: tuple[str, ...], root: Path = SOUNDS_ROOT
) -> dict[str, dict[int, Path]]:
    """language -> digit -> the GSM file of that digit; raises MissingRecordings naming what
    is missing and the command that installs it.

    The packages install ``<root>/<lang>_<REGION>_<voice>/digits/<d>.gsm``.
    """
    found: dict[str, dict[int, Path]] = {}
    missing: list[str] = []
    for lang in languages:
        paths = {d: sorted(root.glob(f"{lang}_*/digits/{d}.gsm")) for d in DIGITS}
        absent = [d for d, p in paths.items() if not p]
        if absent:
            missing.append(f"{lang} (digits {absent})")
        found[lang] = {d: p[0] for d, p in paths.items() if p}
    if missing:
        raise MissingRecordings(
            f"AV-Digits recordings missing under {root}: {', '.join(missing)}. "
            f"Install them with: {install_command(languages)}"
        )
    return found


def load_gsm(path: Path, rate: int = 16000) -> np.ndarray:
    """Decode an audio file with PyAV to mono float32 at ``rate``: (N,)."""
    chunks: list[np.ndarray] = []
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.audio[0]):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    wave = np.concatenate(chunks).astype(np.float32)
    return wave - wave.mean()


def load_recordings(
    languages: tuple[str, ...], rate: int = 16000, root: Path = SOUNDS_ROOT
) -> dict[str, list[np.ndarray]]:
    """language -> [waveform of digit 0, ..., digit 9], each (N,) float32 at ``rate``."""
    files = find_recordings(languages, root)
    return {lang: [load_gsm(files[lang][d], rate) for d in DIGITS] for lang in languages}


# ---------------------------------------------------------------------------------------------
# Audio augmentation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioAugment:
    speed: tuple[float, float] = (0.85, 1.15)  # tempo and pitch together (resampling)
    semitones: tuple[float, float] = (-3.0, 3.0)  # pitch shift at constant tempo
    snr_db: tuple[float, float] = (5.0, 30.0)  # white noise level
    peak: tuple[float, float] = (0.3, 0.9)  # loudness (peak amplitude)


def change_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """Play ``factor`` times faster (shorter, higher) by linear-interpolation resampling."""
    n_out = max(2, round(wave.size / factor))
    positions = np.linspace(0.0, wave.size - 1, n_out)
    return np.interp(positions, np.arange(wave.size), wave).astype(np.float32)


def time_stretch(wave: np.ndarray, rate: float, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """Phase-vocoder time stretch: ``rate`` > 1 is shorter, pitch unchanged."""
    x = torch.from_numpy(wave).double()
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spec = torch.stft(x, n_fft, hop, window=window, return_complex=True)  # (F, N)
    spec = torch.cat([spec, torch.zeros_like(spec[:, :1])], dim=1)  # pad for t + 1
    steps = torch.arange(0, spec.shape[1] - 1, rate, dtype=torch.float64)
    lo = steps.floor().long()
    frac = (steps - lo)[None, :]
    mag = (1 - frac) * spec[:, lo].abs() + frac * spec[:, lo + 1].abs()
    expected = torch.linspace(0, math.pi * hop, spec.shape[0], dtype=torch.float64)[:, None]
    delta = spec[:, lo + 1].angle() - spec[:, lo].angle() - expected
    delta = delta - 2 * math.pi * torch.round(delta / (2 * math.pi))  # wrap to [-pi, pi]
    phase = torch.cumsum(torch.cat([spec[:, :1].angle(), (delta + expected)[:, :-1]], 1), 1)
    out = torch.istft(torch.polar(mag, phase), n_fft, hop, window=window)
    return out.float().numpy()


def pitch_shift(wave: np.ndarray, semitones: float) -> np.ndarray:
    """Shift pitch by ``semitones`` at (about) the same duration."""
    ratio = 2.0 ** (semitones / 12.0)
    return change_speed(time_stretch(wave, 1.0 / ratio), ratio)


def add_noise(rng: np.random.Generator, wave: np.ndarray, snr_db: float) -> np.ndarray:
    """White noise at ``snr_db`` relative to the signal's mean power."""
    power = float(np.mean(wave**2)) / 10.0 ** (snr_db / 10.0)
    return wave + rng.standard_normal(wave.size).astype(np.float32) * np.float32(math.sqrt(power))


def place(rng: np.random.Generator, wave: np.ndarray, length: int) -> np.ndarray:
    """Put ``wave`` at a random offset in ``length`` samples of silence (cut if longer)."""
    wave = wave[:length]
    start = int(rng.integers(0, length - wave.size + 1))
    out = np.zeros(length, dtype=np.float32)
    out[start : start + wave.size] = wave
    return out


def augment_audio(
    rng: np.random.Generator, wave: np.ndarray, aug: AudioAugment, length: int
) -> np.ndarray:
    """A random rendition of an utterance: (length,) float32 in [-1, 1]."""
    x = change_speed(wave, rng.uniform(*aug.speed))
    x = pitch_shift(x, rng.uniform(*aug.semitones))
    x = add_noise(rng, place(rng, x, length), rng.uniform(*aug.snr_db))
    return (x * (rng.uniform(*aug.peak) / max(1e-6, float(np.abs(x).max())))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: images (1797, 8, 8) float32 in [0, 1], labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def split_images(labels: np.ndarray, seed: int) -> dict[str, dict[int, np.ndarray]]:
    """split -> digit -> image indices: each digit's images shuffled and cut in thirds."""
    rng = np.random.default_rng([seed, 8])
    out: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    for d in DIGITS:
        idx = rng.permutation(np.flatnonzero(labels == d))
        for s, part in zip(SPLITS, np.array_split(idx, len(SPLITS)), strict=True):
            out[s][d] = part
    return out


@dataclass(frozen=True)
class ImageAugment:
    side: tuple[float, float] = (0.4, 0.65)  # digit box side / frame side
    rotation_deg: float = 15.0  # uniform in +-
    travel: float = 0.25  # max displacement over the clip, in frame sides
    noise_std: float = 8.0  # pixel noise (0-255 scale)


def _affine_grid(rng: np.random.Generator, aug: ImageAugment, frames: int, size: int) -> Tensor:
    """(frames, size, size, 2) sampling grid of the 8 x 8 image for a moving, rotated digit."""
    side = rng.uniform(*aug.side)
    angle = math.radians(rng.uniform(-aug.rotation_deg, aug.rotation_deg))
    room = 1.0 - side  # centre range in [-room, room] (normalised coords)
    start = rng.uniform(-room, room, size=2) * 0.8
    move = rng.uniform(-1, 1, size=2) * aug.travel * 2
    end = np.clip(start + move, -room, room)
    cos, sin = math.cos(angle) / side, math.sin(angle) / side
    theta = []
    for t in np.linspace(0.0, 1.0, frames):
        cx, cy = start + (end - start) * t
        # output coords (x, y) -> image coords: R/side applied to (x - c)
        theta.append([[cos, -sin, -(cos * cx - sin * cy)], [sin, cos, -(sin * cx + cos * cy)]])
    return F.affine_grid(torch.tensor(theta, dtype=torch.float32), [frames, 1, size, size], False)


def render_digit(
    rng: np.random.Generator, image: np.ndarray, aug: ImageAugment, frames: int, size: int
) -> tuple[Tensor, Tensor]:
    """Frames (T, 3, S, S) uint8 of the digit moving over a background, and its ink alpha
    (T, S, S) float in [0, 1]."""
    grid = _affine_grid(rng, aug, frames, size)
    src = torch.from_numpy(image)[None, None].expand(frames, 1, 8, 8)
    alpha = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = alpha.clamp(0, 1)  # (T, 1, S, S)
    hues = rng.uniform(0, 1, size=2)
    ink = torch.tensor(_hsv(hues[0], rng.uniform(0.5, 1.0), rng.uniform(0.8, 1.0)))
    back = torch.tensor(_hsv(hues[1], rng.uniform(0.0, 0.4), rng.uniform(0.1, 0.45)))
    rgb = back[None, :, None, None] * (1 - alpha) + ink[None, :, None, None] * alpha
    noise = torch.from_numpy(rng.standard_normal((frames, 1, size, size)).astype(np.float32))
    rgb = rgb * 255.0 + noise * aug.noise_std
    return rgb.clamp(0, 255).round().to(torch.uint8), alpha[:, 0]


def _hsv(h: float, s: float, v: float) -> list[float]:
    return list(colorsys.hsv_to_rgb(h, s, v))


def token_mask(alpha: Tensor, patch: int, threshold: float = 0.1) -> Tensor:
    """(T, S, S) ink alpha -> (T * (S/p)^2,) bool: video tokens whose mean ink > threshold,
    in the model's token order (frame, row, col)."""
    t, s, _ = alpha.shape
    g = s // patch
    cells = alpha.reshape(t, g, patch, g, patch).mean(dim=(2, 4))
    return (cells > threshold).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Clip sets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AVDigitsConfig:
    task_digits: tuple[tuple[int, ...], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    task_languages: tuple[str, ...] = ("en", "es", "fr", "it")  # spoken in the tasks
    pretrain_languages: tuple[str, ...] = ("ru",)  # spoken in pretraining, all ten digits
    train_per_task: int = 160  # training clips per task
    eval_per_task: int = 64  # held-out retrieval clips per task
    pretrain_train: int = 320  # pretraining clips (all digits, pretrain images)
    pretrain_eval: int = 64  # held-out pretraining clips (AVM accuracy, sanity)
    seed: int = 0  # fixes the image split and every augmentation draw
    audio: AudioAugment = field(default_factory=AudioAugment)
    image: ImageAugment = field(default_factory=ImageAugment)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.task_languages + self.pretrain_languages))


@dataclass
class _Sources:
    waves: dict[str, list[np.ndarray]]
    images: np.ndarray
    split: dict[str, dict[int, np.ndarray]]


def build_clips(
    src: _Sources,
    digits: tuple[int, ...],
    languages: tuple[str, ...],
    image_split: str,
    n: int,
    rng: np.random.Generator,
    cfg: AVDigitsConfig,
    media: MediaConfig,
    patch: int,
) -> ClipSet:
    """n clips with labels balanced over ``digits``, each a random utterance (language) of the
    digit with a random image of it from ``image_split``."""
    labels = rng.permutation(np.resize(np.array(digits), n))
    length = round(((media.audio_frames - 1) * 0.010 + 0.025) * media.sample_rate)
    fbanks, frames, masks = [], [], []
    for d in labels:
        wave = src.waves[languages[rng.integers(len(languages))]][d]
        audio = augment_audio(rng, wave, cfg.audio, length)
        fbanks.append(audio_features(torch.from_numpy(audio), media))
        image = src.images[rng.choice(src.split[image_split][d])]
        video, alpha = render_digit(rng, image, cfg.image, media.num_frames, media.frame_size)
        frames.append(video)
        masks.append(token_mask(alpha, patch))
    return ClipSet(
        torch.stack(fbanks), torch.stack(frames), torch.from_numpy(labels), torch.stack(masks)
    )


def load_sources(cfg: AVDigitsConfig, rate: int) -> _Sources:
    """The recordings (raises MissingRecordings) and the image split."""
    images, labels = digit_images()
    return _Sources(load_recordings(cfg.languages, rate), images, split_images(labels, cfg.seed))


def build_avdigits(
    cfg: AVDigitsConfig, media: MediaConfig, patch: int
) -> tuple[tuple[ClipSet, ClipSet], list[tuple[ClipSet, ClipSet]]]:
    """((pretrain train, pretrain eval), [(task train, task held-out eval), ...])."""
    src = load_sources(cfg, media.sample_rate)
    all_digits = tuple(sorted({d for g in cfg.task_digits for d in g}))

    def make(task: int, split: int, digits, langs, images: str, n: int) -> ClipSet:
        rng = np.random.default_rng([cfg.seed, task, split])  # disjoint draws per set
        return build_clips(src, digits, langs, images, n, rng, cfg, media, patch)

    pre = cfg.pretrain_languages
    pretrain = (
        make(999, 0, all_digits, pre, "pretrain", cfg.pretrain_train),
        make(999, 1, all_digits, pre, "heldout", cfg.pretrain_eval),
    )
    langs = cfg.task_languages
    tasks = [
        (
            make(k, 0, digits, langs, "train", cfg.train_per_task),
            make(k, 1, digits, langs, "heldout", cfg.eval_per_task),
        )
        for k, digits in enumerate(cfg.task_digits)
    ]
    logger.info("AV-Digits: %d tasks %s, languages %s", len(tasks), cfg.task_digits, langs)
    return pretrain, tasks
