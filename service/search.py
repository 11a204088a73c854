"""``/search``: nearest kept clips in one version's space (contract/index.py).

An index holds the embeddings one published version made of every kept clip (``flava
reembed``). A search answers from the version asked, or from the newest version with a
complete index, and says which. ``GET /search?clip_id=`` takes the clip's own vector in that
index as the query; ``POST /search`` embeds the posted clip with that same version (through
the embedders, as ``POST /embed?version=`` does), so query and gallery share one space.

The API loads indexes itself (numpy + faiss, no torch), the newest few kept in memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import anyio
import numpy as np
from fastapi import HTTPException

from contract import index as vindex
from contract import wire

LOADED_MAX = 2  # indexes held in memory per API process (the newest and a pinned one)


class IndexCache:
    """Version -> loaded index, least recently used dropped past LOADED_MAX."""

    def __init__(self, index_dir: str):
        self.index_dir = index_dir
        self._loaded: OrderedDict[str, vindex.VersionIndex] = OrderedDict()

    def versions(self) -> list[str]:
        return vindex.complete_versions(self.index_dir)

    async def get(self, version: str | None) -> vindex.VersionIndex:
        """The index of ``version`` (default: the newest complete one); 404 if none."""
        listed = await anyio.to_thread.run_sync(self.versions)
        if version is None:
            if not listed:
                reason = "no search index yet: run `flava reembed` (it indexes a published version)"
                raise HTTPException(404, {"code": "no_index", "reason": reason})
            version = listed[-1]
        else:
            version = str(wire.ModelVersion.parse(version))
            if version not in listed:
                reason = f"no complete index of version {version}; indexed: {listed}"
                raise HTTPException(404, {"code": "index_unknown", "reason": reason})
        loaded = self._loaded.get(version)
        if loaded is None:
            loaded = await anyio.to_thread.run_sync(
                vindex.VersionIndex.load, self.index_dir, version
            )
            self._loaded[version] = loaded
        else:  # parts appended since (flava reembed --follow), or a new full pass
            try:
                await anyio.to_thread.run_sync(loaded.refresh, self.index_dir)
            except FileNotFoundError:  # removed (pruned) since it was listed
                del self._loaded[version]
                reason = f"the index of version {version} was just removed; search again"
                raise HTTPException(404, {"code": "index_unknown", "reason": reason}) from None
        self._loaded.move_to_end(version)
        while len(self._loaded) > LOADED_MAX:
            self._loaded.popitem(last=False)
        return loaded


def by_clip(index: vindex.VersionIndex, clip_id: str, direction: str) -> np.ndarray:
    """The query vector of a kept clip: its own vector in the index; 404 if not indexed."""
    query_modality = vindex.DIRECTIONS[direction][0]
    vector = index.vector(clip_id, query_modality)
    if vector is None:
        why = "it came after the index was made, or its inputs were not kept: `flava reembed`"
        raise not_indexed(index, clip_id, why)
    return vector


async def run(
    index: vindex.VersionIndex,
    query: np.ndarray,
    direction: str,
    k: int,
    exact: bool,
    exclude: frozenset[str] = frozenset(),
) -> dict:
    """Search off the event loop and shape the answer."""
    gallery = vindex.DIRECTIONS[direction][1]
    hits = await anyio.to_thread.run_sync(
        lambda: index.search(query, gallery, k, exact=exact, exclude=exclude)
    )
    return {
        "version": index.version,
        "direction": direction,
        "k": k,
        "indexed": len(index),
        "search": "exact" if exact or gallery not in index.graphs else "hnsw",
        "hits": [{"clip_id": h.clip_id, "task": h.task, "score": h.score} for h in hits],
    }


# A tombstone applies to the indexes whose full pass began after it, less this: the API's and
# the indexer's clocks may differ
CLOCK_MARGIN_S = 600.0
# ... and is kept at least this long: a pass under way (not yet listed) may hold the clip
TOMBSTONE_MIN_AGE_S = 24 * 3600.0


async def tombstones(redis, keys: wire.Keys, index: vindex.VersionIndex) -> frozenset[str]:
    """Clips deleted (DELETE /clips) since ``index``'s full pass began: their rows may still
    be in its files, and search leaves them out."""
    since = index.pass_started - CLOCK_MARGIN_S
    deleted = await redis.zrangebyscore(keys.deleted, since, "+inf")
    return frozenset(wire.as_text(cid) for cid in deleted)


async def bury(redis, keys: wire.Keys, clip_ids: list[str]) -> None:
    """Tombstones for clips being deleted (before they are: a search never sees one alive)."""
    now = time.time()
    await redis.zadd(keys.deleted, {cid: now for cid in clip_ids})


async def unbury(redis, keys: wire.Keys, clip_ids: list[str]) -> None:
    """Take back the tombstones of a delete that found nothing."""
    await redis.zrem(keys.deleted, *clip_ids)


async def prune_tombstones(redis, keys: wire.Keys, index_dir: str) -> int:
    """Drop the tombstones older than every index's pass (those were made without the clips)
    and than TOMBSTONE_MIN_AGE_S; -> how many were dropped."""
    starts = await anyio.to_thread.run_sync(vindex.pass_starts, index_dir)
    cutoff = min([s - CLOCK_MARGIN_S for s in starts] + [time.time() - TOMBSTONE_MIN_AGE_S])
    return await redis.zremrangebyscore(keys.deleted, "-inf", f"({cutoff}")


def not_indexed(index: vindex.VersionIndex, clip_id: str, why: str) -> HTTPException:
    reason = f"clip {clip_id[:12]} is not in the index of version {index.version}: {why}"
    return HTTPException(404, {"code": "not_indexed", "reason": reason})


def query_vector(reply: wire.QueryReply, direction: str) -> np.ndarray:
    """The posted clip's embedding (from the embedder's reply) in the query modality."""
    rows = reply.audio if vindex.DIRECTIONS[direction][0] == "audio" else reply.video
    return np.asarray(rows[0], dtype=np.float32)
