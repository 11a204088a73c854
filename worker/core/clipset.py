"""Decoded clips held as tensors: the unit of pretraining, benchmarks and probe sets.

A ``ClipSet`` keeps N clips' model inputs (frames as uint8 to save memory; ImageNet
normalisation happens per batch in ``to_batch``) and, for generated data, the ground truth
of where the sounding object is (token masks at the model's grid).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worker.core.learner import Batch, Learner
from worker.core.media import IMAGENET_MEAN, IMAGENET_STD, Clip

_CHUNK = 16  # clips per generation job
_MEAN = IMAGENET_MEAN.view(1, 1, 3, 1, 1)
_STD = IMAGENET_STD.view(1, 1, 3, 1, 1)


@dataclass
class ClipSet:
    """Model inputs for N clips (and, for generated clips, where the sounding object is)."""

    fbank: Tensor  # (N, audio_frames, mel_bins) float32, normalised
    frames: Tensor  # (N, T, 3, S, S) uint8 RGB (ImageNet normalisation at batch time)
    labels: Tensor  # (N,) int64 class / digit / task
    objects: Tensor  # (N, Lv) bool: video tokens on the sounding object
    distractors: Tensor | None = None  # (N, Lv) bool: video tokens on silent distractors
    objects_a: Tensor | None = None  # (N, La) bool: audio tokens carrying the object's events

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor) -> ClipSet:
        """The clips ``idx`` (a view of every field)."""
        values = {f.name: _take(getattr(self, f.name), idx) for f in fields(self)}
        return ClipSet(**values)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors only (loads with ``torch.load(weights_only=True)``)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ClipSet:
        return cls(**state)


def _take(value: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if value is None else value[idx]


def concat_sets(sets: list[ClipSet]) -> ClipSet:
    """One ClipSet of all clips of ``sets`` (optional fields kept when every set has them)."""
    out: dict[str, Tensor | None] = {}
    for f in fields(ClipSet):
        parts = [getattr(s, f.name) for s in sets]
        out[f.name] = None if any(p is None for p in parts) else torch.cat(parts)
    return ClipSet(**out)  # type: ignore[arg-type]


def uint8_frames(clip: Clip) -> Tensor:
    """A decoded clip's frames back to uint8 RGB (exact: the decoder produced uint8)."""
    rgb = (clip.frames * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return rgb.round().clamp(0, 255).to(torch.uint8)


def to_batch(clips: ClipSet, idx: Tensor) -> Batch:
    """Model inputs of clips ``idx``: frames uint8 -> ImageNet-normalised float."""
    frames = (clips.frames[idx].float() / 255.0 - _MEAN) / _STD
    return Batch(clips.fbank[idx], frames, labels=clips.labels[idx])


def batch_order(n: int, steps: int, batch: int, rng: np.random.Generator) -> Tensor:
    """(steps, batch) clip indices: shuffled epochs over n clips, back to back."""
    if steps <= 0:
        return torch.zeros(0, batch, dtype=torch.int64)
    epochs = math.ceil(steps * batch / n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return torch.from_numpy(order[: steps * batch].reshape(steps, batch))


def chunks(n: int, size: int) -> list[Tensor]:
    """Consecutive index ranges of at most ``size`` covering 0..n-1."""
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def embed_clips(learner: Learner, clips: ClipSet, chunk: int = 32) -> tuple[Tensor, Tensor]:
    """Retrieval embeddings of every clip: (N, D) audio, (N, D) video."""
    parts = [learner.embed(to_batch(clips, idx)) for idx in chunks(len(clips), chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# make(spec, *extra) -> the ClipSet fields of one clip (0-dim label, masks, ...)
ClipMaker = Callable[..., dict[str, Tensor]]


def _make_chunk(args: tuple[ClipMaker, list[Any], tuple]) -> list[dict[str, np.ndarray]]:
    """Clips of a chunk of specs as numpy arrays (tensors would travel between processes as
    shared-memory file descriptors, which die with a worker process that exits after a job)."""
    torch.set_num_threads(1)
    make, specs, extra = args
    return [{k: v.numpy() for k, v in make(s, *extra).items()} for s in specs]


def build_clipset(
    make: ClipMaker, specs: list[Any], extra: tuple, pool: cf.Executor | None = None
) -> ClipSet:
    """``make(spec, *extra)`` for every spec (chunks of 16 in ``pool`` when given)."""
    jobs = [(make, specs[i : i + _CHUNK], extra) for i in range(0, len(specs), _CHUNK)]
    results = pool.map(_make_chunk, jobs) if pool else map(_make_chunk, jobs)
    clips = [c for part in results for c in part]
    return ClipSet(**{k: torch.from_numpy(np.stack([c[k] for c in clips])) for k in clips[0]})
