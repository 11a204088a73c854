"""The replay memory on disk as append-only segments, so checkpoints stay cheap.

At `tiny`'s default capacity the memory holds 1.2 GB of decoded clips; rewriting it whole
every checkpoint would dwarf the update it protects. Instead each checkpoint writes one
segment ``mem-{G:06d}-{N:010d}.pt``: the rows the memory wrote since the previous checkpoint
(``ReplayMemory.take_changes``), and lists, in order, the segments that rebuild its memory.
Once the segments since the last full one add up to ``compact_factor`` x capacity rows,
the next segment holds the whole memory and the list restarts from it. The directory
therefore needs up to about (2 + compact_factor) x the memory's bytes (a full segment and
its deltas, plus an older chain the kept checkpoints still list): ~3.6 GB at `tiny`'s 2,000
clips of ~0.6 MB.

``segments.json`` maps each kept checkpoint to its list; a segment no kept checkpoint
lists is deleted (never when a kept checkpoint's list is unknown).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.core.files import atomic_torch_save, atomic_write
from worker.core.memory import ReplayMemory

log = logging.getLogger(__name__)
MANIFEST = "segments.json"


def segment_name(version: str) -> str:
    generation, updates = (int(x) for x in version.split("."))
    return f"mem-{generation:06d}-{updates:010d}.pt"


@dataclass(eq=False)  # compared by identity: it holds tensors
class Segment:
    name: str
    changes: dict  # a ReplayMemory.take_changes() segment


@dataclass
class MemorySegments:
    """The lineage's segment list, and the segments taken but not yet on disk."""

    directory: Path
    capacity: int
    compact_factor: float = 1.0  # disk: at most (1 + this) x the memory per kept lineage
    names: list[str] = field(default_factory=list)  # rebuilds the newest snapshot's memory
    unwritten: list[Segment] = field(default_factory=list)  # a failed write retries these
    rows_since_full: int = 0  # rows in the deltas after the list's full segment

    def take(self, memory: ReplayMemory, version: str) -> list[str]:
        """Take the memory's changes as the segment of ``version`` (training thread);
        returns the list that rebuilds the memory as of now."""
        full = not self.names or self.rows_since_full >= self.compact_factor * self.capacity
        changes = memory.take_changes(everything=full)
        rows = len(changes["slots"])
        name = segment_name(version)
        self.unwritten.append(Segment(name, changes))
        self.names = [name] if full else [*self.names, name]
        self.rows_since_full = 0 if full else self.rows_since_full + rows
        return list(self.names)

    def write(self, pending: list[Segment]) -> None:
        """Write the segments of a checkpoint job (writer thread), oldest first."""
        for seg in pending:
            atomic_torch_save(seg.changes, self.directory / seg.name)

    def written(self, pending: list[Segment]) -> None:
        """Once the job is durable, its segments need no retry."""
        self.unwritten = [s for s in self.unwritten if s not in pending]

    def load(self, names: list[str]) -> list[dict]:
        """Read a checkpoint's segments (raises if one is missing or damaged)."""
        return [_load(self.directory / n) for n in names]

    def restore(self, memory: ReplayMemory, names: list[str], segments: list[dict]) -> None:
        """Replay ``segments`` onto ``memory`` and continue this lineage's list."""
        for seg in segments:
            memory.apply_changes(seg)
        self.names = list(names)
        self.rows_since_full = sum(len(s["slots"]) for s in segments[1:])  # after the full one

    def collect(self, checkpoint: str, names: list[str], kept: list[str]) -> None:
        """Record ``checkpoint``'s list; delete segments no kept checkpoint lists."""
        manifest = self._manifest()
        manifest[checkpoint] = names
        manifest = {k: v for k, v in manifest.items() if k in kept}
        atomic_write(self.directory / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
        if set(kept) - set(manifest):
            return  # a kept checkpoint's list is unknown: delete nothing
        used = {n for listed in manifest.values() for n in listed} | set(names)
        for path in self.directory.glob("mem-*.pt"):
            if path.name not in used:
                path.unlink(missing_ok=True)

    def _manifest(self) -> dict[str, list[str]]:
        try:
            return json.loads((self.directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
