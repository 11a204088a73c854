"""Search indexes: one model version's embeddings of the kept clips, on disk, and their search.

The format is a contract between ``flava reembed`` (worker/reembed.py, the writer: it embeds
every kept clip with one published version) and the API (the reader: ``/search``). Like the
rest of contract/ it imports no torch.

An index holds **one version's space** (docs/versions.md): every vector in it was made by the
same weights, so a query embedded by that version can be compared with all of them. Layout of
``index_dir/{G.N}/``, written into a temporary directory and renamed whole, so an index that
exists is complete:

- ``meta.json``: version, count, dim, made_at, seconds, ann (whether HNSW graphs are stored)
- ``ids.json``: the clip ids (a window is "{upload}:{i}") and their tasks, row order
- ``audio.npy``, ``video.npy``: (count, dim) float32, each row L2-normalised
- ``audio.faiss``, ``video.faiss``: HNSW graphs (faiss, inner product = cosine on unit rows)
  when count >= ``ANN_MIN``; smaller indexes are searched exactly.

Search: cosine similarity, exact (one matrix-vector product) or approximate (faiss HNSW,
``HNSW_M`` links, ``EF_SEARCH`` candidates; bench/perf_search.py measures recall@10 against
exact search at 100,000 vectors).
"""

from __future__ import annotations

import json
import os
import shutil
import time
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


def write_index(
    index_dir: str | Path,
    version: str,
    ids: list[str],
    tasks: list[str],
    audio: np.ndarray,
    video: np.ndarray,
    seconds: float = 0.0,
) -> Path:
    """Write one version's index (replacing an older one of that version) atomically."""
    final = version_dir(index_dir, version)
    tmp = final.with_name(f".{version}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    audio, video = unit_rows(audio), unit_rows(video)
    np.save(tmp / "audio.npy", audio)
    np.save(tmp / "video.npy", video)
    (tmp / "ids.json").write_text(json.dumps({"ids": ids, "tasks": tasks}))
    ann = len(ids) >= ANN_MIN
    if ann:
        for name, vectors in (("audio", audio), ("video", video)):
            _save_hnsw(build_hnsw(vectors), tmp / f"{name}.faiss")
    meta = {
        "version": version,
        "count": len(ids),
        "dim": int(audio.shape[1]) if len(ids) else 0,
        "made_at": time.time(),
        "seconds": round(seconds, 3),
        "ann": ann,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    old = final.with_name(f".{version}.{os.getpid()}.old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


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
class VersionIndex:
    """One version's index loaded for search."""

    version: str
    ids: list[str]
    tasks: list[str]
    vectors: dict[str, np.ndarray]  # "audio" | "video" -> (count, dim) unit rows
    graphs: dict[str, Any] = field(default_factory=dict)  # HNSW per modality, when stored
    made_at: float = 0.0
    _rows: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, index_dir: str | Path, version: str) -> VersionIndex:
        folder = version_dir(index_dir, version)
        meta = json.loads((folder / "meta.json").read_text())
        listed = json.loads((folder / "ids.json").read_text())
        vectors = {m: np.load(folder / f"{m}.npy", mmap_mode="r") for m in ("audio", "video")}
        graphs = {}
        if meta["ann"]:
            import faiss

            for m in ("audio", "video"):
                graphs[m] = faiss.read_index(str(folder / f"{m}.faiss"))
                faiss.ParameterSpace().set_index_parameter(graphs[m], "efSearch", EF_SEARCH)
        index = cls(version, listed["ids"], listed["tasks"], vectors, graphs, meta["made_at"])
        index._rows = {cid: i for i, cid in enumerate(index.ids)}
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def vector(self, clip_id: str, modality: str) -> np.ndarray | None:
        """A clip's stored vector in this version's space, or None if it is not indexed."""
        row = self._rows.get(clip_id)
        return None if row is None else np.asarray(self.vectors[modality][row])

    def search(
        self,
        query: np.ndarray,
        gallery: str,
        k: int,
        exact: bool = False,
        exclude: str | None = None,
    ) -> list[Hit]:
        """The ``k`` clips whose ``gallery`` vectors are nearest ``query`` by cosine."""
        q = unit_rows(np.asarray(query, dtype=np.float32).reshape(1, -1))
        want = min(len(self.ids), k + (exclude is not None))
        if want == 0:
            return []
        if gallery in self.graphs and not exact:
            scores, rows = self.graphs[gallery].search(q, want)
            pairs = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
        else:
            sims = np.asarray(self.vectors[gallery]) @ q[0]
            top = np.argpartition(-sims, want - 1)[:want]
            top = top[np.argsort(-sims[top])]
            pairs = [(int(r), float(sims[r])) for r in top]
        hits = [Hit(self.ids[r], self.tasks[r], s) for r, s in pairs if self.ids[r] != exclude]
        return hits[:k]
