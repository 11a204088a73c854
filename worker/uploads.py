"""The files of uploads cut into windows (contract/windows.py): removed once settled.

An upload longer than one example keeps its bytes in ``blob_dir/{upload id}`` (written by the
API, read by the decode processes), not in Redis. The ack or dead letter of its last window
reports it finished (``ClipQueue.finished_uploads``) and the worker removes the file. What a
crash between that ack and the removal leaves, and the API's partial writes of uploads that
never arrived whole, are removed by :func:`sweep` when a worker starts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis

from contract import wire
from contract.windows import PARTIAL_SUFFIX, upload_path

log = logging.getLogger(__name__)
PARTIAL_MAX_AGE_S = 3600.0  # an upload still being written after an hour was abandoned


def remove(blob_dir: str | Path, upload_ids: list[str]) -> None:
    """Remove the files of uploads whose windows have all settled."""
    for upload_id in upload_ids:
        upload_path(blob_dir, upload_id).unlink(missing_ok=True)
        log.info("upload %s: every window settled, file removed", upload_id[:12])


def sweep(client: redis.Redis, keys: wire.Keys, blob_dir: str | Path) -> int:
    """Remove upload files no queued window needs (settled, deleted or lost with Redis) and
    partial writes older than PARTIAL_MAX_AGE_S; returns how many went."""
    folder = Path(blob_dir)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        if path.name.endswith(PARTIAL_SUFFIX):
            stale = time.time() - path.stat().st_mtime > PARTIAL_MAX_AGE_S
        elif wire.CLIP_ID_PATTERN.match(path.name):
            state = client.hget(keys.clip(path.name), "state")
            stale = state is None or wire.as_text(state) in wire.SETTLED_STATES
        else:
            continue  # not ours
        if stale:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d upload file(s) no window needs in %s", removed, folder)
    return removed
