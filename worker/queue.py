"""The worker's side of the Redis contract: read, reclaim, finish and dead-letter entries.

Delivery order: this consumer's own pending entries first (a restart re-reads what it held
when it died), then entries other consumers left idle past ``claim_min_idle_ms``, then new
ones. Every path that removes an entry from the pending list goes through one Lua script
of :mod:`contract.wire`, so the embedding or dead letter is written before the ack.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.exceptions import ResponseError

from contract import wire

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this worker."""

    entry_id: str
    entry: wire.ClipEntry
    deliveries: int  # times Redis has handed it out, this one included


class ClipQueue:
    """Consumer ``consumer`` of the learners group on the clip stream."""

    def __init__(self, client: redis.Redis, keys: wire.Keys, consumer: str, min_idle_ms: int):
        self.redis = client
        self.keys = keys
        self.consumer = consumer
        self.min_idle_ms = min_idle_ms
        self._finish = client.register_script(wire.FINISH_SCRIPT)
        self._dead = client.register_script(wire.DEAD_LETTER_SCRIPT)
        self._own_pending = True  # re-read own pending entries until none are left

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.stream, wire.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim_own_pending(self) -> int:
        """Count what this consumer held when it stopped; the next reads re-deliver it.

        Re-reading history (XREADGROUP id 0) increments each entry's delivery count, so a
        clip that crashes the worker every time reaches ``max_deliveries`` and is
        dead-lettered instead of looping forever."""
        ids = self._pending_ids(self.consumer)
        if ids:
            log.info("%d pending entries of %s will be re-read", len(ids), self.consumer)
        self._own_pending = bool(ids)
        return len(ids)

    def reread_pending(self) -> None:
        """Make the next read start again from this consumer's own pending entries."""
        self._own_pending = True

    @property
    def rereading(self) -> bool:
        """Whether the next read re-reads own pending entries (id 0), not new ones.

        While it does, a batch read ahead would hand back entries still in hand."""
        return self._own_pending

    def next_batch(self, count: int, block_ms: int | None) -> list[Delivery]:
        """Up to ``count`` deliveries: own pending, then idle reclaimed, then new.

        ``block_ms`` None: do not wait for new entries."""
        if self._own_pending:
            batch = self._read("0", count, None)
            if batch:
                return batch
            self._own_pending = False
        batch = self._autoclaim(count)
        return batch or self._read(">", count, block_ms)

    def _read(self, start: str, count: int, block_ms: int | None) -> list[Delivery]:
        reply: Any = self.redis.xreadgroup(
            wire.GROUP, self.consumer, {self.keys.stream: start}, count=count, block=block_ms
        )
        entries = [(eid, f) for _, items in reply or [] for eid, f in items if f]
        return self._with_delivery_counts(entries)

    def _autoclaim(self, count: int) -> list[Delivery]:
        reply = self.redis.xautoclaim(
            self.keys.stream, wire.GROUP, self.consumer, self.min_idle_ms, "0-0", count=count
        )
        entries = [(eid, f) for eid, f in reply[1] if f]
        if entries:
            log.info("reclaimed %d idle entries from dead consumers", len(entries))
        return self._with_delivery_counts(entries)

    def _with_delivery_counts(self, entries: list) -> list[Delivery]:
        if not entries:
            return []
        ids = [_text(eid) for eid, _ in entries]
        counts = self._delivery_counts(ids)
        return [
            Delivery(eid, wire.ClipEntry.from_fields(fields), counts.get(eid, 1))
            for eid, (_, fields) in zip(ids, entries, strict=True)
        ]

    def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        rows = self.redis.xpending_range(
            self.keys.stream,
            wire.GROUP,
            min=min(ids),
            max=max(ids),
            count=len(ids) * 4 + 16,
            consumername=self.consumer,
        )
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    def _pending_ids(self, consumer: str) -> list[str]:
        rows = self.redis.xpending_range(
            self.keys.stream, wire.GROUP, min="-", max="+", count=100_000, consumername=consumer
        )
        return [_text(r["message_id"]) for r in rows]

    def fetch_blobs(self, deliveries: list[Delivery]) -> list[bytes | None]:
        """The clips' bytes (None where the blob expired or was never written)."""
        if not deliveries:
            return []
        blobs: list[Any] = self.redis.mget([self.keys.blob(d.entry.clip_id) for d in deliveries])
        return blobs

    def clip_state(self, deliveries: list[Delivery]) -> list[str]:
        pipe = self.redis.pipeline(transaction=False)
        for d in deliveries:
            pipe.hget(self.keys.clip(d.entry.clip_id), "state")
        return [_text(s) if s else "" for s in pipe.execute()]

    def finish(self, delivery: Delivery, embedding: wire.Embedding | None, state: str) -> bool:
        """Write the embedding (if any) and the clip's state, then ack; True if acked now."""
        return self.finish_many([(delivery, embedding, state)])[0]

    def finish_many(self, items: list[tuple[Delivery, wire.Embedding | None, str]]) -> list[bool]:
        """``finish`` for a batch in one round trip; each script stays atomic on its own, and
        a retry after an outage is harmless (a second ack of an entry is a no-op)."""
        pipe = self.redis.pipeline(transaction=False)
        for delivery, embedding, state in items:
            self._finish_one(pipe, delivery, embedding, state)
        return [bool(acked) for acked in pipe.execute()]

    def _finish_one(self, pipe, delivery: Delivery, embedding, state: str) -> None:
        fields = wire.flatten(embedding.to_fields()) if embedding else []
        cid = delivery.entry.clip_id
        self._finish(
            client=pipe,
            keys=[
                self.keys.stream,
                self.keys.clip(cid),
                self.keys.embedding(cid),
                self.keys.backlog,
                self.keys.blob(cid),
            ],
            args=[wire.GROUP, delivery.entry_id, state, delivery.deliveries, *fields],
        )

    def dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Move an entry to the dead-letter stream with its reason, then ack it."""
        cid = delivery.entry.clip_id
        log.warning("dead-lettering clip %s: %s", cid[:12], reason)
        acked = self._dead(
            keys=[
                self.keys.stream,
                self.keys.dead,
                self.keys.clip(cid),
                self.keys.backlog,
                self.keys.blob(cid),
            ],
            args=[
                wire.GROUP,
                delivery.entry_id,
                reason[:500],
                delivery.deliveries,
                *wire.flatten(delivery.entry.to_fields()),
            ],
        )
        return bool(acked)

    def heartbeat(self, model: dict[str, Any]) -> None:
        """Announce liveness (for /readyz) and publish the model's version."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.keys.workers, {self.consumer: time.time()})
        if model:
            pipe.hset(self.keys.model, mapping=cast(Any, model))
        pipe.execute()

    def published_version(self) -> int:
        """The newest model version any worker published (versions never go backwards)."""
        value = self.redis.hget(self.keys.model, "version")
        return int(value) if value else 0

    def depths(self) -> tuple[int, int, int]:
        """(backlog, pending for the group, dead letters)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.backlog)
        pipe.xpending(self.keys.stream, wire.GROUP)
        pipe.xlen(self.keys.dead)
        backlog, pending, dead = pipe.execute()
        return int(backlog or 0), int(pending["pending"]), int(dead)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
