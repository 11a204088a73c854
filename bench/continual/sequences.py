"""Task sequences as tensors: a pretraining split and (train, held-out) sets per task, cached.

Three sequences:

- ``localized`` (worker/core/localized.py): scenes of one sounding object and silent
  distractors, one audio-visual rule shared by every task; tasks are drifted hue/pitch bands,
  shape subsets and backgrounds; the pretraining split covers the whole range. Ground truth
  for the sounding object's and the distractors' tokens comes with every clip.
- ``synthetic`` (worker/core/synthetic.py): classes of moving objects; pretraining sees
  classes no task uses.
- ``avdigits`` (bench/avdigits.py): spoken digits with handwritten ones; needs recordings.

Generated clips go through real MP4 bytes and the service's decoder, like uploads.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.avdigits import AVDigitsConfig, build_avdigits
from worker.core import localized
from worker.core.clipset import ClipSet, build_clipset, uint8_frames
from worker.core.files import atomic_torch_save
from worker.core.media import MediaConfig, decode_clip, frame_times
from worker.core.model import ModelConfig
from worker.core.scenes import scene_tensors
from worker.core.synthetic import ClipSpec, StreamConfig, clip_tracks, make_clip

logger = logging.getLogger(__name__)

SEQUENCES = ("localized", "synthetic", "avdigits")


@dataclass
class SequenceData:
    """A task sequence as tensors: a pretraining set and (train, held-out) per task."""

    name: str
    pretrain: tuple[ClipSet, ClipSet]  # (train, held-out) of the separate distribution
    tasks: list[tuple[ClipSet, ClipSet]]  # (train, held-out retrieval set) per task
    task_names: list[str]
    build_seconds: float = 0.0  # time to generate / decode every clip


# ---------------------------------------------------------------------------------------------
# localized
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalizedSetConfig:
    scene: localized.LocalizedConfig = field(default_factory=localized.LocalizedConfig)
    train_per_task: int = 192  # training clips per task
    eval_per_task: int = 64  # held-out retrieval clips per task
    pretrain_train: int = 512  # pretraining clips (task -1); 2,048 left the AVM at chance
    pretrain_eval: int = 64  # held-out pretraining clips
    seed: int = 0  # fixes every scene


def build_localized(
    cfg: LocalizedSetConfig, model: ModelConfig, pool: cf.Executor | None
) -> SequenceData:
    """Pretraining split (task -1) and every task's train / held-out scenes."""
    media, patch = model.media(), model.patch

    def clips(task: int, n: int, split: str) -> ClipSet:
        specs = localized.scene_specs(cfg.scene, task, n, cfg.seed, split)
        return build_clipset(scene_tensors, specs, (cfg.scene, media, patch), pool)

    pretrain = (clips(-1, cfg.pretrain_train, "train"), clips(-1, cfg.pretrain_eval, "heldout"))
    tasks = [
        (clips(k, cfg.train_per_task, "train"), clips(k, cfg.eval_per_task, "heldout"))
        for k in range(cfg.scene.num_tasks)
    ]
    return SequenceData("localized", pretrain, tasks, localized.task_names(cfg.scene))


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    num_tasks: int = 4  # tasks in the sequence
    classes_per_task: int = 4  # sounding-object classes per task
    pretrain_classes: int = 8  # classes only the pretraining sees (interleaved with tasks')
    train_per_task: int = 192  # training clips per task
    eval_per_task: int = 64  # held-out retrieval clips per task
    pretrain_train: int = 384  # pretraining clips
    pretrain_eval: int = 64  # held-out pretraining clips
    seed: int = 0  # fixes every clip

    @property
    def num_classes(self) -> int:
        return self.num_tasks * self.classes_per_task + self.pretrain_classes

    def stream(self) -> StreamConfig:
        """The generator settings: one segment per task plus one for pretraining."""
        pitch_step = min(3.0, 44.0 / max(1, self.num_classes - 1))  # stay below Nyquist/4
        return StreamConfig(
            num_classes=self.num_classes,
            num_segments=self.num_tasks + 1,
            classes_per_segment=self.classes_per_task,
            pitch_step=pitch_step,
        )

    def class_split(self) -> tuple[list[int], list[list[int]]]:
        """(pretraining classes, classes of each task).

        Every ``stride``-th class goes to pretraining so it spans the whole range of pitches,
        hues, shapes and timbres; the rest, in order, are cut into tasks.
        """
        if self.num_classes % self.pretrain_classes:
            raise ValueError("num_tasks * classes_per_task must be a multiple of pretrain_classes")
        stride = self.num_classes // self.pretrain_classes
        pre = list(range(stride - 1, self.num_classes, stride))
        rest = [c for c in range(self.num_classes) if c not in pre]
        n = self.classes_per_task
        return pre, [rest[i * n : (i + 1) * n] for i in range(self.num_tasks)]


def synthetic_specs(
    segment: int, classes: list[int], n: int, seed: int, split: int
) -> list[ClipSpec]:
    """n clip specs with labels balanced over ``classes``; even seeds train, odd held out."""
    rng = np.random.default_rng([seed, segment, split])
    labels = rng.permutation(np.resize(np.array(classes), n))
    seeds = rng.choice(2**60, size=n, replace=False) * 2 + split
    return [ClipSpec(segment, int(c), int(s)) for c, s in zip(labels, seeds, strict=True)]


def object_tokens(spec: ClipSpec, stream: StreamConfig, media: MediaConfig, patch: int) -> Tensor:
    """(Lv,) bool: video tokens a quarter covered by the sounding object's box, at the frames
    ``decode_clip`` picks (eval mode), in the model's (frame, row, col) order."""
    track = clip_tracks(spec, stream)[0]
    scale = media.frame_size / stream.size  # square frames: resize without crop
    g = media.frame_size // patch
    cells = torch.arange(g) * patch
    out = []
    for t in frame_times(stream.seconds, media):
        x, y = track.positions[min(round(t * stream.fps), stream.num_frames - 1)] * scale
        side = track.size * scale
        ox = torch.minimum(cells + patch, torch.tensor(x + side)) - torch.clamp(cells, min=x)
        oy = torch.minimum(cells + patch, torch.tensor(y + side)) - torch.clamp(cells, min=y)
        cover = oy.clamp(min=0)[:, None] * ox.clamp(min=0)[None, :] / patch**2  # (rows, cols)
        out.append(cover >= 0.25)
    return torch.stack(out).reshape(-1)


def synthetic_clip(
    spec: ClipSpec, stream: StreamConfig, media: MediaConfig, patch: int
) -> dict[str, Tensor]:
    """One generated clip through real MP4 bytes: fbank, uint8 frames, object-token mask."""
    clip = decode_clip(make_clip(spec, stream), media)
    return {
        "fbank": clip.fbank,
        "frames": uint8_frames(clip),
        "labels": torch.tensor(spec.label),
        "objects": object_tokens(spec, stream, media, patch),
    }


def build_synthetic(
    cfg: SyntheticConfig, model: ModelConfig, pool: cf.Executor | None
) -> SequenceData:
    """The synthetic drifting stream: pretraining segment, then one segment per task."""
    stream, media, patch = cfg.stream(), model.media(), model.patch
    pre_classes, task_classes = cfg.class_split()

    def clips(segment: int, classes: list[int], n: int, split: int) -> ClipSet:
        specs = synthetic_specs(segment, classes, n, cfg.seed, split)
        return build_clipset(synthetic_clip, specs, (stream, media, patch), pool)

    pre_seg = cfg.num_tasks
    pretrain = (
        clips(pre_seg, pre_classes, cfg.pretrain_train, 0),
        clips(pre_seg, pre_classes, cfg.pretrain_eval, 1),
    )
    tasks = [
        (clips(k, c, cfg.train_per_task, 0), clips(k, c, cfg.eval_per_task, 1))
        for k, c in enumerate(task_classes)
    ]
    return SequenceData("synthetic", pretrain, tasks, [f"classes {c}" for c in task_classes])


# ---------------------------------------------------------------------------------------------
# generation, AV-Digits, cache
# ---------------------------------------------------------------------------------------------


def build_digits(cfg: AVDigitsConfig, model: ModelConfig, pool: cf.Executor | None) -> SequenceData:
    """AV-Digits (raises MissingRecordings with the install command when packages are absent)."""
    pretrain, tasks = build_avdigits(cfg, model.media(), model.patch)
    names = [f"digits {list(d)}" for d in cfg.task_digits]
    return SequenceData("avdigits", pretrain, tasks, names)


BUILDERS: dict[str, Callable[[Any, ModelConfig, cf.Executor | None], SequenceData]] = {
    "localized": build_localized,
    "synthetic": build_synthetic,
    "avdigits": build_digits,
}


def config_key(*parts: Any) -> str:
    """A short stable hash of dataclasses / plain values."""
    plain = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_sequence(
    name: str, seq_cfg: Any, model: ModelConfig, cache_dir: Path, pool: cf.Executor | None
) -> Path:
    """The sequence's tensors, built once and cached (AV-Digits may raise MissingRecordings)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown sequence {name!r}; known: {', '.join(SEQUENCES)}")
    path = cache_dir / f"{name}-{config_key(name, seq_cfg, model)}.pt"
    if not path.exists():
        start = time.perf_counter()
        seq = BUILDERS[name](seq_cfg, model, pool)
        seq.build_seconds = time.perf_counter() - start
        save_sequence(seq, path)
        logger.info("%s: clips built in %.0f s -> %s", name, seq.build_seconds, path)
    return path


def save_sequence(seq: SequenceData, path: Path) -> None:
    state = {
        "name": seq.name,
        "task_names": seq.task_names,
        "build_seconds": seq.build_seconds,
        "pretrain": [c.state_dict() for c in seq.pretrain],
        "tasks": [[c.state_dict() for c in pair] for pair in seq.tasks],
    }
    atomic_torch_save(state, path)


def load_sequence(path: Path) -> SequenceData:
    s = torch.load(path, weights_only=True)
    train, held = (ClipSet.from_state_dict(c) for c in s["pretrain"])
    tasks = [(ClipSet.from_state_dict(a), ClipSet.from_state_dict(b)) for a, b in s["tasks"]]
    names = list(s["task_names"])
    return SequenceData(s["name"], (train, held), tasks, names, float(s["build_seconds"]))
