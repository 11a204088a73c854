"""Search indexes: one model version's embeddings of the kept clips, on disk, and their search.

The format is a contract between ``flava reembed`` (worker/reembed.py, the writer: it embeds
every kept clip with one published version) and the API (the reader: ``/search``). Like the
rest of contract/ it imports no torch.

An index holds **one version's space** (docs/versions.md): every vector in it was made by the
same weights, so a query embedded by that version can be compared with all of them. Layout of
``index_dir/{G.N}/``:

- ``meta.json``: version, count, dim, parts, made_at (the full pass), updated_at
- ``part-00000/``, ``part-00001/``, ...: rows written together: the full pass that made the
  index, then the clips that landed since (``append_part``, ``flava reembed --follow``), each
  embedded by the same version. A part holds ``ids.json`` (clip ids, "{upload}:{i}" for a
  window, and their tasks), ``audio.npy`` and ``video.npy`` ((count, dim) float32, L2-normalised
  rows), and ``audio.faiss`` / ``video.faiss`` (HNSW graphs, inner product = cosine on unit
  rows) when it holds at least ``ANN_MIN`` rows; smaller parts are searched exactly.

A full pass is built aside and renamed whole, and a part is renamed in before ``meta.json``
(replaced atomically) counts it: an index that exists is complete, and a reader sees a part
whole or not at all.

Search: cosine similarity per part, exact (one matrix-vector product) or approximate (faiss
HNSW, ``HNSW_M`` links, ``EF_SEARCH`` candidates; bench/perf_search.py measures recall@10
against exact search at 100,000 vectors), the parts' best merged.

Deleting: a clip deleted after an index was made (DELETE /clips) keeps its row in the
index's files until the next full pass (which no longer finds its kept inputs). The API
records a **tombstone** (``{p}:deleted`` in Redis, the clip id scored by the deletion time)
and leaves out of every search, and of ``vector``, the tombstones of clips deleted since the
index's full pass began (``made_at - seconds``, less a margin for clocks); older tombstones
are dropped once every index was made after them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DIRECTIONS = {
    "a2v": ("audio", "video"),
    "v2a": ("video", "audio"),
    "a2a": ("audio", "audio"),
    "v2v": ("video", "video"),
}  # (query, gallery)
ANN_MIN = 20_000  # smaller indexes are searched exactly: as fast, and exact
HNSW_M = 32  # graph links per node
EF_CONSTRUCTION = 80
EF_SEARCH = 128  # candidates per query: recall@10 vs latency (bench/perf_search.py)


INPUT_SUFFIX = ".npz"


def input_path(inputs_dir: str | Path, clip_id: str) -> Path:
    """Where the worker keeps a clip's decoded inputs (worker/inputs.py), which the indexes
    are made from; a window "{upload}:{i}" is the file "{upload}-{i}"."""
    name = clip_id.replace(":", "-")
    return Path(inputs_dir) / name[:2] / f"{name}{INPUT_SUFFIX}"


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) float32 with each row L2-normalised (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def version_dir(index_dir: str | Path, version: str) -> Path:
    return Path(index_dir) / version


def complete_versions(index_dir: str | Path) -> list[str]:
    """The versions with a complete index, oldest first (by (G, N))."""
    folder = Path(index_dir)
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if (p / "meta.json").exists()]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def pass_starts(index_dir: str | Path) -> list[float]:
    """When the full pass of each complete index began (unix s; its meta's made_at - seconds)."""
    starts = []
    for version in complete_versions(index_dir):
        try:
            meta = json.loads((version_dir(index_dir, version) / "meta.json").read_text())
        except FileNotFoundError:  # pruned since it was listed
            continue
        starts.append(float(meta["made_at"]) - float(meta.get("seconds", 0.0)))
    return starts


def prune_indexes(index_dir: str | Path, keep: int) -> list[str]:
    """Remove all but the newest ``keep`` version indexes; returns the versions removed."""
    versions = complete_versions(index_dir)
    gone = versions[: max(0, len(versions) - keep)]
    for version in gone:
        folder = version_dir(index_dir, version)
        doomed = folder.with_name(f".{version}.{os.getpid()}.gone")
        folder.rename(doomed)  # unlisted at once; readers holding it keep their mmaps
        shutil.rmtree(doomed, ignore_errors=True)
    return gone


def write_index(
    index_dir: str | Path,
    version: str,
    ids: list[str],
    tasks: list[str],
    audio: np.ndarray,
    video: np.ndarray,
    seconds: float = 0.0,
) -> Path:
    """Write one version's index with one part (a full pass), replacing an older index of
    that version, atomically: the directory is built aside and renamed whole."""
    final = version_dir(index_dir, version)
    tmp = final.with_name(f".{version}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_part(tmp / _part_name(0), ids, tasks, audio, video)
    meta = {
        "version": version,
        "count": len(ids),
        "dim": int(np.asarray(audio).shape[1]) if len(ids) else 0,
        "made_at": time.time(),
        "updated_at": time.time(),
        "parts": 1,
        "seconds": round(seconds, 3),
    }
    _write_json(tmp / "meta.json", meta)
    old = final.with_name(f".{version}.{os.getpid()}.old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def append_part(
    index_dir: str | Path,
    version: str,
    ids: list[str],
    tasks: list[str],
    audio: np.ndarray,
    video: np.ndarray,
) -> int:
    """Add clips that landed after the index was made, as a new part of the version's index
    (embedded by the same version); returns the part's number. The part is built aside and
    renamed in, then ``meta.json`` is replaced: a reader sees it whole or not at all."""
    folder = version_dir(index_dir, version)
    meta = json.loads((folder / "meta.json").read_text())
    number = int(meta["parts"])
    tmp = folder / f".{_part_name(number)}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_part(tmp, ids, tasks, audio, video)
    tmp.rename(folder / _part_name(number))
    meta.update(parts=number + 1, count=int(meta["count"]) + len(ids), updated_at=time.time())
    _write_json(folder / "meta.json", meta)
    return number


def _part_name(number: int) -> str:
    return f"part-{number:05d}"


def _write_part(
    folder: Path, ids: list[str], tasks: list[str], audio: np.ndarray, video: np.ndarray
) -> None:
    folder.mkdir(parents=True)
    audio, video = unit_rows(audio), unit_rows(video)
    np.save(folder / "audio.npy", audio)
    np.save(folder / "video.npy", video)
    _write_json(folder / "ids.json", {"ids": ids, "tasks": tasks})
    if len(ids) >= ANN_MIN:
        for name, vectors in (("audio", audio), ("video", video)):
            _save_hnsw(build_hnsw(vectors), folder / f"{name}.faiss")


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def build_hnsw(vectors: np.ndarray) -> Any:
    """A faiss HNSW graph over unit rows, searched by inner product (= cosine)."""
    import faiss  # only where an index is built or searched approximately

    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _save_hnsw(index: Any, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


@dataclass
class Hit:
    clip_id: str
    task: str
    score: float  # cosine similarity


@dataclass
class Part:
    """One part of an index: rows written together (a full pass, or clips that landed since)."""

    ids: list[str]
    tasks: list[str]
    vectors: dict[str, np.ndarray]  # "audio" | "video" -> (count, dim) unit rows
    graphs: dict[str, Any] = field(default_factory=dict)  # HNSW per modality, when stored

    @classmethod
    def load(cls, folder: Path) -> Part:
        listed = json.loads((folder / "ids.json").read_text())
        vectors = {m: np.load(folder / f"{m}.npy", mmap_mode="r") for m in ("audio", "video")}
        graphs = {}
        for m in ("audio", "video"):
            if (folder / f"{m}.faiss").exists():
                import faiss

                graphs[m] = faiss.read_index(str(folder / f"{m}.faiss"))
                faiss.ParameterSpace().set_index_parameter(graphs[m], "efSearch", EF_SEARCH)
        return cls(listed["ids"], listed["tasks"], vectors, graphs)

    def search(
        self, q: np.ndarray, gallery: str, want: int, exact: bool
    ) -> list[tuple[int, float]]:
        """(row, cosine) of the ``want`` nearest rows, best first."""
        want = min(want, len(self.ids))
        if want == 0:
            return []
        if gallery in self.graphs and not exact:
            scores, rows = self.graphs[gallery].search(q, want)
            return [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
        sims = np.asarray(self.vectors[gallery]) @ q[0]
        top = np.argpartition(-sims, want - 1)[:want]
        top = top[np.argsort(-sims[top])]
        return [(int(r), float(sims[r])) for r in top]


@dataclass
class VersionIndex:
    """One version's index loaded for search: its parts, searched together."""

    version: str
    parts: list[Part]
    made_at: float = 0.0
    updated_at: float = 0.0
    seconds: float = 0.0  # the full pass's length: clips deleted during it may be in part 0
    _rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (part, row)

    @classmethod
    def load(cls, index_dir: str | Path, version: str) -> VersionIndex:
        index = cls(version, [])
        index.refresh(index_dir)
        return index

    def refresh(self, index_dir: str | Path) -> bool:
        """Load the parts appended since this was loaded; True if there were any."""
        folder = version_dir(index_dir, self.version)
        meta = json.loads((folder / "meta.json").read_text())
        if meta["made_at"] != self.made_at:  # rewritten by a full pass: start over
            self.parts, self._rows = [], {}
        self.made_at, self.updated_at = meta["made_at"], meta["updated_at"]
        self.seconds = float(meta.get("seconds", 0.0))
        added = False
        for number in range(len(self.parts), int(meta["parts"])):
            part = Part.load(folder / _part_name(number))
            self._rows.update((cid, (number, row)) for row, cid in enumerate(part.ids))
            self.parts.append(part)
            added = True
        return added

    @property
    def pass_started(self) -> float:
        """When the full pass that made this index began (unix s)."""
        return self.made_at - self.seconds

    @property
    def ids(self) -> list[str]:
        return [cid for part in self.parts for cid in part.ids]

    @property
    def graphs(self) -> set[str]:
        """The modalities searched approximately (by HNSW) in some part."""
        return {m for part in self.parts for m in part.graphs}

    def __len__(self) -> int:
        return sum(len(part.ids) for part in self.parts)

    def vector(self, clip_id: str, modality: str) -> np.ndarray | None:
        """A clip's stored vector in this version's space, or None if it is not indexed."""
        where = self._rows.get(clip_id)
        if where is None:
            return None
        part, row = where
        return np.asarray(self.parts[part].vectors[modality][row])

    def search(
        self,
        query: np.ndarray,
        gallery: str,
        k: int,
        exact: bool = False,
        exclude: Collection[str] = (),
    ) -> list[Hit]:
        """The ``k`` clips whose ``gallery`` vectors are nearest ``query`` by cosine, over
        every part (each part's best, merged), none of ``exclude`` (the query itself,
        tombstones of deleted clips): each part is asked for as many more as it holds of
        them, so ``k`` are found whenever the index has them."""
        q = unit_rows(np.asarray(query, dtype=np.float32).reshape(1, -1))
        left_out = {cid for cid in exclude if cid in self._rows}
        found = [
            Hit(part.ids[row], part.tasks[row], score)
            for number, part in enumerate(self.parts)
            for row, score in part.search(q, gallery, k + self._held(number, left_out), exact)
        ]
        found.sort(key=lambda h: h.score, reverse=True)
        return [h for h in found if h.clip_id not in left_out][:k]

    def _held(self, number: int, clip_ids: set[str]) -> int:
        """How many of ``clip_ids`` part ``number`` holds."""
        return sum(self._rows[cid][0] == number for cid in clip_ids)
