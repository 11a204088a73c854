"""Queue clips exactly as the API does (same Lua script), without HTTP, for worker tests."""

from __future__ import annotations

import hashlib

import redis

from contract import wire

LIMITS = wire.IngestLimits(blob_ttl_s=3600, max_backlog=100_000, max_backlog_bytes=1 << 40)


def enqueue(
    client, keys: wire.Keys, payload: bytes, purpose: str = "train", task: str = "t"
) -> str:
    """Claim-check ``payload`` and add its stream entry; returns the clip id."""
    cid = hashlib.sha256(payload).hexdigest()
    entry = wire.ClipEntry(cid, len(payload), "video/mp4", task, purpose)
    script = client.register_script(wire.INGEST_SCRIPT)
    script_keys, args = wire.ingest_call(keys, entry, payload, LIMITS)
    outcome, *_ = script(keys=script_keys, args=args)
    assert outcome == b"queued", outcome
    return cid


def deliver(client, keys: wire.Keys, consumer: str = "c1") -> dict[str, str]:
    """Read every new entry into ``consumer``'s pending list, as a worker does;
    returns clip id -> entry id."""
    try:
        client.xgroup_create(keys.stream, wire.GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:  # BUSYGROUP: the group exists already
        assert "BUSYGROUP" in str(exc)
    read = client.xreadgroup(wire.GROUP, consumer, {keys.stream: ">"}, count=1000)
    entries = read[0][1] if read else []
    return {fields[b"clip_id"].decode(): eid.decode() for eid, fields in entries}


def dead_letter(client, keys: wire.Keys, clip_id: str, entry_id: str, reason: str) -> int:
    """Dead-letter a delivered entry with the worker's script; 1 if it was acked."""
    script = client.register_script(wire.DEAD_LETTER_SCRIPT)
    return script(
        keys=[keys.stream, keys.dead, keys.clip(clip_id), keys.backlog, keys.blob(clip_id)],
        args=[wire.GROUP, entry_id, reason, 1, 0, "clip_id", clip_id],
    )


def stream_clips(n: int, seed: int) -> list[bytes]:
    """``n`` real MP4 clips of one synthetic segment."""
    from worker.core.synthetic import StreamConfig, make_clip, segment_specs

    cfg = StreamConfig(num_segments=1)
    return [make_clip(s, cfg) for s in segment_specs(cfg, 0, n, seed=seed)]
