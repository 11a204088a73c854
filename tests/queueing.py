"""Queue clips exactly as the API does (same Lua script), without HTTP, for worker tests."""

from __future__ import annotations

import hashlib

from contract import wire


def enqueue(
    client, keys: wire.Keys, payload: bytes, purpose: str = "train", task: str = "t"
) -> str:
    """Claim-check ``payload`` and add its stream entry; returns the clip id."""
    cid = hashlib.sha256(payload).hexdigest()
    entry = wire.ClipEntry(cid, len(payload), "video/mp4", task, purpose)
    script = client.register_script(wire.INGEST_SCRIPT)
    outcome, _ = script(
        keys=[keys.clip(cid), keys.blob(cid), keys.stream, keys.backlog],
        args=[payload, 3600, 100_000, *wire.flatten(entry.to_fields())],
    )
    assert outcome == b"queued", outcome
    return cid
