"""``flava reembed``: embed every kept clip with one published version and write its index.

The backfill of the version contract (docs/versions.md): a clip's stored embedding is the one
of the version that processed it, so no live set of embeddings shares one space. This embeds
the kept inputs (worker/inputs.py) with the published snapshot ``version`` (worker/models.py)
in batches, without training, and writes that version's search index (contract/index.py),
which ``/search`` and ``GET /embed?version=`` then answer from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract import wire
from contract.index import write_index
from worker.embedder import embed_clips
from worker.inputs import InputStore, KeptInput
from worker.models import load_model, published_versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReembedResult:
    version: str
    count: int
    seconds: float
    path: Path


def newest_published(models_dir: str | Path) -> str:
    versions = published_versions(models_dir)
    if not versions:
        raise FileNotFoundError(f"no published model in {models_dir}")
    return str(max(versions))


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
    started = time.perf_counter()
    version = str(wire.ModelVersion.parse(version)) if version else newest_published(models_dir)
    loaded = load_model(models_dir, version)
    store = InputStore(Path(inputs_dir))
    ids: list[str] = []
    tasks: list[str] = []
    audio: list[torch.Tensor] = []
    video: list[torch.Tensor] = []
    chunk: list[KeptInput] = []

    def flush() -> None:
        emb_a, emb_v = embed_clips(loaded, [k.clip for k in chunk])
        ids.extend(k.clip_id for k in chunk)
        tasks.extend(k.task for k in chunk)
        audio.append(emb_a)
        video.append(emb_v)
        if progress is not None:
            progress(len(chunk))
        chunk.clear()

    for kept in store.scan(task=task, preset=loaded.card.preset):
        chunk.append(kept)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    dim = loaded.model.cfg.dim
    a = torch.cat(audio).numpy() if audio else np.zeros((0, dim), np.float32)
    v = torch.cat(video).numpy() if video else np.zeros((0, dim), np.float32)
    seconds = time.perf_counter() - started
    path = write_index(index_dir, version, ids, tasks, a, v, seconds)
    log.info("version %s: %d clips embedded and indexed in %.1f s", version, len(ids), seconds)
    return ReembedResult(version, len(ids), seconds, path)
