"""Kept inputs: each clip's decoded model inputs, so a published version can re-embed it.

A clip's embedding is made once, by the version that processed it (docs/versions.md). To
embed stored clips with another version (``flava reembed``, the search index of a version) the
clips must be kept. We keep the **decoded inputs** (fbank and frames, float16), not the
uploaded bytes:

- re-embedding then costs one model call per batch, no decode (decoding is most of a clip's
  cost on a CPU: docs/media.md), and gives exactly the inputs the learner saw (the eval span);
- a long upload's file is removed once its windows settled, but its windows' inputs stay;
- at ``tiny`` a clip's inputs are 285 kB (a 3 s camera clip is about 1 MB); at ``base`` they
  are 1.5 MB, more than most short clips' bytes: the retention budget bounds either.

Layout: ``inputs_dir/{id[:2]}/{id}.npz`` (``fbank``, ``frames``, ``task``, ``preset``), written
atomically (temp + rename) by the learner after decoding. Not fsynced: the inputs are a cache
for backfills, and a crash that loses the last ones loses no learning. Retention
(:meth:`InputStore.sweep`): files older than ``max_age_days`` go, then the oldest until the
store is under ``max_bytes``. ``DELETE /clips/{id}`` removes a clip's file (``input_path``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.index import INPUT_SUFFIX as SUFFIX
from contract.index import input_path
from worker.core.media import Clip

log = logging.getLogger(__name__)


def clip_id_of(path: Path) -> str:
    stem = path.name[: -len(SUFFIX)]
    upload, _, window = stem.partition("-")
    return f"{upload}:{window}" if window else upload


@dataclass(frozen=True)
class KeptInput:
    clip_id: str
    task: str
    preset: str
    clip: Clip


@dataclass
class InputStore:
    """Decoded inputs of the clips the learner saw, bounded by bytes and age."""

    directory: Path
    max_bytes: int = 10 * 1024**3
    max_age_days: float = 30.0
    sweep_every_s: float = 600.0
    _last_sweep: float = 0.0

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    @classmethod
    def from_settings(cls, settings) -> InputStore | None:
        """The worker's store (WorkerSettings.inputs_*); None when inputs_dir is ""."""
        if not settings.inputs_dir:
            return None
        directory = Path(settings.inputs_dir)
        return cls(directory, settings.inputs_max_bytes, settings.inputs_max_days)

    def put(self, clip_id: str, task: str, preset: str, clip: Clip) -> None:
        """Keep one clip's inputs (float16); replaces an earlier copy."""
        path = input_path(self.directory, clip_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.savez(
                f,
                fbank=clip.fbank.to(torch.float16).numpy(),
                frames=clip.frames.to(torch.float16).numpy(),
                task=np.array(task),
                preset=np.array(preset),
                duration_s=np.array(clip.duration_s),
            )
        tmp.replace(path)

    def maybe_sweep(self) -> int:
        """:meth:`sweep` at most every ``sweep_every_s``."""
        if time.monotonic() - self._last_sweep < self.sweep_every_s:
            return 0
        return self.sweep()

    def sweep(self) -> int:
        """Apply the retention: older than ``max_age_days``, then the oldest past ``max_bytes``;
        returns how many files went."""
        self._last_sweep = time.monotonic()
        files = sorted(self._files(), key=lambda p: p[1].st_mtime)  # oldest first
        cutoff = time.time() - self.max_age_days * 86400
        total = sum(st.st_size for _, st in files)
        removed = 0
        for path, st in files:
            if st.st_mtime >= cutoff and total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= st.st_size
            removed += 1
        if removed:
            log.info("kept inputs: %d file(s) past the retention removed", removed)
        return removed

    def _files(self) -> Iterator[tuple[Path, os.stat_result]]:
        if not self.directory.is_dir():
            return
        for path in self.directory.glob(f"*/*{SUFFIX}"):
            try:
                yield path, path.stat()
            except FileNotFoundError:
                continue

    def scan(
        self,
        task: str | None = None,
        preset: str | None = None,
        skip: Container[str] = (),
    ) -> Iterator[KeptInput]:
        """Every kept clip (of ``task`` / ``preset`` when given), in file-name order; clips
        in ``skip`` are passed over by their file name, without reading them."""
        for path in sorted(p for p, _ in self._files()):
            if clip_id_of(path) in skip:
                continue
            try:
                kept = read_input(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("kept input %s unreadable (%s): skipped", path.name, exc)
                continue
            if (task is None or kept.task == task) and (preset is None or kept.preset == preset):
                yield kept


def read_input(path: Path) -> KeptInput:
    with np.load(path) as f:
        clip = Clip(
            fbank=torch.from_numpy(f["fbank"]).float(),
            frames=torch.from_numpy(f["frames"]).float(),
            duration_s=float(f["duration_s"]),
        )
        return KeptInput(clip_id_of(path), str(f["task"]), str(f["preset"]), clip)
