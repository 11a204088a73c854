"""``flava reembed``: embed every kept clip with one published version and write its index.

The backfill of the version contract (docs/versions.md): a clip's stored embedding is the one
of the version that processed it, so no live set of embeddings shares one space. This embeds
the kept inputs (worker/inputs.py) with the published snapshot ``version`` (worker/models.py)
in batches, without training, and writes that version's search index (contract/index.py),
which ``/search`` and ``GET /embed?version=`` then answer from.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract import wire
from contract.index import append_part, prune_indexes, write_index
from worker.embedder import embed_clips
from worker.inputs import InputStore, KeptInput
from worker.models import LoadedModel, load_model, published_versions

log = logging.getLogger(__name__)
HEARTBEAT = ".follower"  # touched in the index directory every round of --follow


@dataclass(frozen=True)
class ReembedResult:
    version: str
    count: int
    seconds: float
    path: Path
    ids: list[str]  # the clips indexed


@dataclass
class Embedded:
    """Kept clips embedded by one version: ids, tasks and (N, D) float32 vectors."""

    ids: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    video: list[np.ndarray] = field(default_factory=list)

    def add(self, chunk: list[KeptInput], loaded: LoadedModel) -> None:
        emb_a, emb_v = embed_clips(loaded, [k.clip for k in chunk])
        self.ids.extend(k.clip_id for k in chunk)
        self.tasks.extend(k.task for k in chunk)
        self.audio.append(emb_a.numpy())
        self.video.append(emb_v.numpy())

    def arrays(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.ids:
            return np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
        return np.concatenate(self.audio), np.concatenate(self.video)


def newest_published(models_dir: str | Path) -> str:
    versions = published_versions(models_dir)
    if not versions:
        raise FileNotFoundError(f"no published model in {models_dir}")
    return str(max(versions))


def embed_kept(
    loaded: LoadedModel,
    kept: Iterable[KeptInput],
    batch: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Embedded:
    """Embed kept clips with one loaded version, ``batch`` per model call."""
    out, chunk = Embedded(), []
    for item in kept:
        chunk.append(item)
        if len(chunk) == batch:
            out.add(chunk, loaded)
            if progress is not None:
                progress(len(chunk))
            chunk = []
    if chunk:
        out.add(chunk, loaded)
        if progress is not None:
            progress(len(chunk))
    return out


def reembed(
    models_dir: str | Path,
    inputs_dir: str | Path,
    index_dir: str | Path,
    version: str | None = None,
    task: str | None = None,
    batch: int = 32,
    progress: Callable[[int], None] | None = None,
) -> ReembedResult:
    """Embed the kept clips (of ``task`` when given) with ``version`` (default: the newest
    published) and write its index; FileNotFoundError when that version is not published."""
    version = str(wire.ModelVersion.parse(version)) if version else newest_published(models_dir)
    return full_pass(load_model(models_dir, version), inputs_dir, index_dir, task, batch, progress)


def full_pass(
    loaded: LoadedModel,
    inputs_dir: str | Path,
    index_dir: str | Path,
    task: str | None = None,
    batch: int = 32,
    progress: Callable[[int], None] | None = None,
) -> ReembedResult:
    started = time.perf_counter()
    store = InputStore(Path(inputs_dir))
    kept = store.scan(task=task, preset=loaded.card.preset)
    done = embed_kept(loaded, kept, batch, progress)
    audio, video = done.arrays(loaded.model.cfg.dim)
    seconds = time.perf_counter() - started
    version = loaded.card.version
    path = write_index(index_dir, version, done.ids, done.tasks, audio, video, seconds)
    log.info("version %s: %d clips embedded and indexed in %.1f s", version, len(done.ids), seconds)
    return ReembedResult(version, len(done.ids), seconds, path, done.ids)


@dataclass
class FollowConfig:
    interval_s: float = 10.0  # how often kept clips not yet indexed are looked for
    refresh_s: float = 3600.0  # a newer published version is indexed afresh at most this often
    keep: int = 2  # version indexes kept (the newest; older ones are removed)
    batch: int = 32


class Follower:
    """``flava reembed --follow``: keeps the index of one published version current.

    A full pass with the newest published version; then, every ``interval_s``, the kept clips
    that landed since are embedded with **that same** version and appended as a part (the
    index stays one version's space). Once ``refresh_s`` has passed and a newer version is
    published, a full pass with it makes its index, which ``/search`` then answers from;
    indexes beyond the newest ``keep`` are removed. The version's weights stay loaded, so its
    snapshot being pruned from the models directory does not stop the appends."""

    def __init__(
        self,
        models_dir: str | Path,
        inputs_dir: str | Path,
        index_dir: str | Path,
        cfg: FollowConfig | None = None,
    ):
        self.models_dir, self.inputs_dir, self.index_dir = models_dir, inputs_dir, index_dir
        self.cfg = cfg or FollowConfig()
        self.loaded: LoadedModel | None = None
        self.indexed: set[str] = set()
        self.base_at = 0.0

    def step(self) -> int:
        """One round: a full pass when due, else the appends; returns the clips indexed."""
        newest = newest_published(self.models_dir)
        current = self.loaded.card.version if self.loaded else None
        due = time.monotonic() - self.base_at >= self.cfg.refresh_s
        if current is None or (newest != current and due):
            self.loaded = load_model(self.models_dir, newest)
            result = full_pass(self.loaded, self.inputs_dir, self.index_dir, batch=self.cfg.batch)
            self.indexed = set(result.ids)
            self.base_at = time.monotonic()
            prune_indexes(self.index_dir, self.cfg.keep)
            return result.count
        return self._append()

    def _append(self) -> int:
        assert self.loaded is not None
        store = InputStore(Path(self.inputs_dir))
        # already indexed clips are skipped by file name: only new files are read
        fresh = store.scan(preset=self.loaded.card.preset, skip=self.indexed)
        done = embed_kept(self.loaded, fresh, self.cfg.batch)
        if done.ids:
            audio, video = done.arrays(self.loaded.model.cfg.dim)
            append_part(
                self.index_dir, self.loaded.card.version, done.ids, done.tasks, audio, video
            )
            self.indexed.update(done.ids)
            log.info("version %s: %d new clips appended", self.loaded.card.version, len(done.ids))
        return len(done.ids)

    def run(self, stop: threading.Event) -> None:
        """Rounds every ``interval_s`` until ``stop``; each touches ``index_dir/.follower``
        (a healthcheck's heartbeat: compose's indexer service)."""
        heartbeat = Path(self.index_dir) / HEARTBEAT
        while not stop.is_set():
            try:
                self.step()
            except FileNotFoundError as exc:  # nothing published yet, or inputs gone
                log.warning("reembed --follow: %s; retrying in %.0f s", exc, self.cfg.interval_s)
            heartbeat.parent.mkdir(parents=True, exist_ok=True)
            heartbeat.touch()
            stop.wait(self.cfg.interval_s)
