"""Durable checkpoints: atomic files, a ledger of the clips in each, an off-thread writer.

A checkpoint is a plain nested dict of tensors, numbers, strings and lists, which is what
``torch.load(weights_only=True)`` accepts, so a tampered file cannot run code on load. It is
written to a temp file, fsynced, renamed to ``ckpt-{G:06d}-{N:010d}.pt`` (the version it
holds, docs/versions.md) and the directory fsynced: once the rename is durable, so is the
snapshot. Newest = highest (G, N).

The **ledger** makes "is every acked clip in the model?" checkable offline: every checkpoint
carries the ids of the clips trained since the previous one and a hash chained over them,
and ``ledger.jsonl`` keeps one line per checkpoint (appended and fsynced before the rename).
Following ``prev`` from a checkpoint's hash back to the start gives every clip its weights
have learned (:func:`ledger_chain`); lines of checkpoints that were never completed are not
on any chain.

The ``generation`` file holds the newest generation a process of this directory started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.core.files import atomic_torch_save, atomic_write

log = logging.getLogger(__name__)
FORMAT = 2  # 1: before generations and the ledger (ckpt-{N:010d}.pt, no "format" key)
NAME = re.compile(r"^ckpt-(?:(\d{6})-)?(\d{10})\.pt$")
TEMP_SUFFIX = ".tmp"  # atomic_write's hidden temp files: .{name}.tmp
LEDGER = "ledger.jsonl"
GENESIS = "0" * 64  # the ``prev`` of the first checkpoint of a lineage


class CheckpointFormatError(ValueError):
    """A checkpoint this worker cannot read (written by a newer one)."""


# ---- files --------------------------------------------------------------------------------
def checkpoint_name(generation: int, updates: int) -> str:
    return f"ckpt-{generation:06d}-{updates:010d}.pt"


def version_of(path: Path) -> tuple[int, int]:
    """ckpt file -> (generation, updates); format-1 names are generation 0."""
    m = NAME.match(path.name)
    if m is None:
        raise ValueError(f"{path.name} is not a checkpoint file name")
    return int(m.group(1) or 0), int(m.group(2))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files, oldest first (by version, not by name or mtime)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if NAME.match(p.name)), key=version_of)


def latest_checkpoint(directory: str | Path) -> Path | None:
    snapshots = list_checkpoints(directory)
    return snapshots[-1] if snapshots else None


def save_checkpoint(directory: str | Path, name: str, state: dict, keep: int = 3) -> Path:
    """Write ``state`` atomically as ``directory/name``; keep the newest ``keep`` snapshots."""
    path = atomic_torch_save(state, Path(directory) / name)
    prune(path.parent, keep)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load with ``weights_only=True``; refuse a format newer than this worker knows."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fmt = state.get("format", 1) if isinstance(state, dict) else None
    if not isinstance(fmt, int):
        raise CheckpointFormatError(f"{path} is not a flava-stream checkpoint")
    if fmt > FORMAT:
        raise CheckpointFormatError(
            f"{path} has checkpoint format {fmt}; this worker reads formats 1-{FORMAT}: "
            "upgrade the worker, or point FLAVA_CHECKPOINT_DIR elsewhere to start anew"
        )
    return state


def load_newest(
    directory: str | Path,
    on_fallback: Callable[[Path, Exception], None],
    complete: Callable[[dict], Any] = lambda state: None,
):
    """-> (path, state, complete(state)) of the newest checkpoint that loads, or None.

    ``complete`` reads what the checkpoint refers to (its memory segments). A corrupt or
    truncated file, or a missing part, is skipped (``on_fallback`` says so) and the one
    before it is tried, so a damaged newest file never crash-loops the worker. A format
    error is not damage: it is raised."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
            return path, state, complete(state)
        except CheckpointFormatError:
            raise
        except Exception as exc:  # truncated zip, bad pickle, I/O error: try the previous one
            on_fallback(path, exc)
    return None


def remove_stale_temps(directory: str | Path) -> int:
    """Delete temp files a killed writer left behind; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if _is_temp(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d stale checkpoint temp files from %s", len(stale), directory)
    return len(stale)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def prune(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


# ---- generations --------------------------------------------------------------------------
def next_generation(directory: str | Path, published: int = 0) -> int:
    """Claim a new generation: one more than any this directory (or Redis) has seen.

    Written and fsynced before the caller publishes anything, so a version name made in
    this generation can never have been made before (docs/versions.md)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen_file = directory / "generation"
    seen = [published, *(version_of(p)[0] for p in list_checkpoints(directory))]
    if gen_file.exists():
        seen.append(int(gen_file.read_text().strip() or 0))
    generation = max(seen) + 1
    atomic_write(gen_file, lambda f: f.write(f"{generation}\n".encode()))
    return generation


# ---- the ledger ---------------------------------------------------------------------------
def chain_hash(prev: str, version: str, clip_ids: list[str]) -> str:
    payload = "\n".join([prev, version, *clip_ids]).encode()
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class LedgerSegment:
    """The clips trained between two checkpoints, as one link of the hash chain."""

    version: str
    prev: str
    hash: str
    clip_ids: list[str]

    @classmethod
    def after(cls, prev: str, version: str, clip_ids: list[str]) -> LedgerSegment:
        return cls(version, prev, chain_hash(prev, version, clip_ids), list(clip_ids))

    def valid(self) -> bool:
        return self.hash == chain_hash(self.prev, self.version, self.clip_ids)


def append_ledger(directory: Path, segment: LedgerSegment) -> None:
    """Append one line, fsynced. A failed append (disk full) is cut off again, and a line
    torn by a crash is ended first, so a new line never glues onto a torn one."""
    path = directory / LEDGER
    torn = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
    with open(path, "a") as f:
        size = f.tell()
        try:
            f.write(("\n" if torn else "") + json.dumps(vars(segment)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(size)
            raise


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def ledger_chain(directory: str | Path, head: str) -> list[LedgerSegment]:
    """The segments from the first checkpoint to the one whose hash is ``head``, in order.

    Raises ValueError if a link is missing or does not hash to itself."""
    by_hash: dict[str, LedgerSegment] = {}
    path = Path(directory) / LEDGER
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        try:
            seg = LedgerSegment(**json.loads(line))
        except (ValueError, TypeError):
            continue  # blank, or torn by a crash mid-append: never a completed checkpoint's
        by_hash[seg.hash] = seg
    chain, cursor = [], head
    while cursor != GENESIS:
        link = by_hash.get(cursor)
        if link is None or not link.valid():
            raise ValueError(f"ledger of {directory}: link {cursor[:12]} missing or altered")
        chain.append(link)
        cursor = link.prev
    return chain[::-1]


# ---- the off-thread writer ----------------------------------------------------------------
@dataclass
class CheckpointJob:
    """One snapshot on its way to disk, and what its being durable settles."""

    name: str
    state: dict  # tensors already copied: training may go on while this is written
    segment: LedgerSegment
    settles: list[Any] = field(default_factory=list)  # handed back once durable
    before: Callable[[], None] | None = None  # writes what the checkpoint refers to
    after: Callable[[list[str]], None] | None = None  # given the kept checkpoints' names
    memory_segments: list[Any] = field(default_factory=list)  # written by ``before``
    error: BaseException | None = None
    seconds: float = 0.0


def detached_copy(state: Any) -> Any:
    """A copy whose tensors training cannot change (cloned); containers copied, rest shared."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: detached_copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(detached_copy(v) for v in state)
    return state


class CheckpointWriter:
    """Writes one checkpoint at a time on a background thread.

    ``submit`` returns at once; ``finished`` hands back the job once it is durable (or
    failed: ``job.error``). Order: ``job.before`` (the memory segments), the ledger line
    (appended, fsynced), the checkpoint (renamed into place), ``job.after`` (cleanup)."""

    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory)
        self.keep = keep
        self._job: CheckpointJob | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._job is not None

    def submit(self, job: CheckpointJob) -> None:
        if self.busy:
            raise RuntimeError("a checkpoint is still being written")
        self._job, self._done = job, threading.Event()
        self._thread = threading.Thread(target=self._write, args=(job,), daemon=True)
        self._thread.start()

    def finished(self, wait: bool = False) -> CheckpointJob | None:
        """The job in flight once it has ended (durable or failed), else None."""
        if self._job is None or not self._done.wait(None if wait else 0):
            return None
        job, self._job = self._job, None
        return job

    def _write(self, job: CheckpointJob) -> None:
        started = time.perf_counter()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if job.before is not None:
                job.before()
            append_ledger(self.directory, job.segment)
            save_checkpoint(self.directory, job.name, job.state, self.keep)
            if job.after is not None:
                job.after([p.name for p in list_checkpoints(self.directory)])
        except BaseException as exc:  # disk full, unwritable: the caller keeps the tail
            job.error = exc
        job.seconds = time.perf_counter() - started
        self._done.set()
