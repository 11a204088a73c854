"""The worker's side of the Redis contract: read, reclaim, publish, ack and dead-letter entries.

Delivery order: this consumer's own pending entries first (a restart re-reads what it held
when it died), then entries of consumers that are gone (no heartbeat for
``claim_min_idle_ms``), then new ones. A clip is published (embedding written, state
``embedded``) after its update and acked only once that update is durable; the entries
published and not yet acked are **held**, and a re-read never hands them out again.
Every path that removes an entry from the pending list goes through one Lua script of
:mod:`contract.wire`, so the embedding or dead letter is written before the ack.

Redis faults: :func:`transient` names the errors to retry (contract/faults.py: outages,
``OOM``, ``READONLY``, ``BUSY``, ``LOADING``); ``NOGROUP`` means Redis lost its data
(:func:`lost_group`): :meth:`ClipQueue.recover_group`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from redis.exceptions import ResponseError

from contract import wire
from contract.faults import unavailable
from contract.windows import upload_path

log = logging.getLogger(__name__)


def transient(exc: BaseException) -> bool:
    """An error that goes away by itself: retry with backoff, never a training failure."""
    return unavailable(exc) is not None


def stream_id(entry_id: str) -> tuple[int, int]:
    """ "1700000000000-12" -> (ms, seq): ids compare as numbers, not strings."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this worker."""

    entry_id: str
    entry: wire.ClipEntry
    deliveries: int  # times Redis has handed it out, this one included


class ClipQueue:
    """Consumer ``consumer`` of the learners group on the clip stream."""

    def __init__(
        self,
        client: redis.Redis,
        keys: wire.Keys,
        consumer: str,
        min_idle_ms: int,
        dead_blob_ttl_s: int = 0,
    ):
        self.redis = client
        self.keys = keys
        self.consumer = consumer
        self.min_idle_ms = min_idle_ms  # a consumer silent this long is gone
        self.dead_blob_ttl_s = dead_blob_ttl_s  # a dead clip's bytes kept for a retry
        self._publish = client.register_script(wire.PUBLISH_SCRIPT)
        self._ack = client.register_script(wire.ACK_SCRIPT)
        self._dead = client.register_script(wire.DEAD_LETTER_SCRIPT)
        self._own_pending = True  # re-read own pending entries until none are left
        self.held: set[str] = set()  # entry ids published, not yet acked (in the model)
        self.finished_uploads: list[str] = []  # uploads whose last window settled: remove files

    # ---- the group --------------------------------------------------------
    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.stream, wire.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def recover_group(self) -> None:
        """After ``NOGROUP`` (Redis lost its data): recreate the group and forget what was held.

        The held entries are gone with the data; their clips stay in the model (the API tells
        clients whose clips vanished to re-send them)."""
        log.error(
            "the stream's consumer group is gone: Redis lost its data; recreating it "
            "(%d published clips can no longer be acked)",
            len(self.held),
        )
        self.ensure_group()
        self.held.clear()
        self._own_pending = True

    # ---- reading ------------------------------------------------------------------------
    def claim_own_pending(self) -> int:
        """Count what this consumer held when it stopped; the next reads re-deliver it.

        Each re-delivery increments the entry's delivery count; the worker subtracts the
        deliveries that ended in an update (``trained``), so only failures count toward
        ``max_deliveries`` and a clip that crashes the worker every time is dead-lettered."""
        ids = self._pending_ids(self.consumer, 100_000)
        if ids:
            log.info("%d pending entries of %s will be re-read", len(ids), self.consumer)
        self._own_pending = bool(ids)
        return len(ids)

    def reread_pending(self) -> None:
        """Make the next read start again from this consumer's own pending entries."""
        self._own_pending = True

    @property
    def rereading(self) -> bool:
        """Whether the next read re-reads own pending entries, not new ones.

        While it does, a batch read ahead would hand back entries still in hand."""
        return self._own_pending

    def next_batch(self, count: int, block_ms: int | None) -> list[Delivery]:
        """Up to ``count`` deliveries: own pending (not held), then gone consumers', then new.

        ``block_ms`` None: do not wait for new entries."""
        if self._own_pending:
            batch = self._claim(self.consumer, count)
            if batch:
                return batch
            self._own_pending = False
        batch = self._reclaim_from_gone(count)
        return batch or self._read(count, block_ms)

    def _read(self, count: int, block_ms: int | None) -> list[Delivery]:
        reply: Any = self.redis.xreadgroup(
            wire.GROUP, self.consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        entries = [(eid, f) for _, items in reply or [] for eid, f in items if f]
        return self._with_delivery_counts(entries)

    def _claim(self, owner: str, count: int) -> list[Delivery]:
        """XCLAIM up to ``count`` of ``owner``'s pending entries that this worker does not hold."""
        pending = self._pending_ids(owner, count + len(self.held))
        ids: list[Any] = [i for i in pending if i not in self.held][:count]
        if not ids:
            return []
        claimed: Any = self.redis.xclaim(self.keys.stream, wire.GROUP, self.consumer, 0, ids)
        entries = [(eid, f) for eid, f in claimed if f]
        gone = len(ids) - len(entries)  # deleted from the stream under us
        if gone:
            log.warning("%d pending entries of %s had no fields left", gone, owner)
        return self._with_delivery_counts(entries)

    def _reclaim_from_gone(self, count: int) -> list[Delivery]:
        """Entries of consumers with no heartbeat for ``min_idle_ms`` (never a live worker's)."""
        for owner in self._gone_consumers():
            batch = self._claim(owner, count)
            if batch:
                log.info("reclaimed %d entries of gone consumer %s", len(batch), owner)
                return batch
        return []

    def _gone_consumers(self) -> list[str]:
        consumers: Any = self.redis.xinfo_consumers(self.keys.stream, wire.GROUP)
        owners = [_text(c["name"]) for c in consumers if int(c["pending"]) > 0]
        owners = [o for o in owners if o != self.consumer]
        if not owners:
            return []
        beats = self.redis.zmscore(self.keys.workers, owners)
        horizon = time.time() - self.min_idle_ms / 1000
        return [o for o, beat in zip(owners, beats, strict=True) if beat is None or beat < horizon]

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
        ordered = sorted(ids, key=stream_id)
        rows = self.redis.xpending_range(
            self.keys.stream,
            wire.GROUP,
            min=ordered[0],
            max=ordered[-1],
            count=len(ids) + len(self.held) + 16,
            consumername=self.consumer,
        )
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    def _pending_ids(self, consumer: str, count: int) -> list[str]:
        rows = self.redis.xpending_range(
            self.keys.stream, wire.GROUP, min="-", max="+", count=count, consumername=consumer
        )
        return [_text(r["message_id"]) for r in rows]

    def fetch_blobs(self, deliveries: list[Delivery], blob_dir: Path) -> list[bytes | Path | None]:
        """Each clip's bytes, or for a window of an upload the upload's file (None where the
        bytes expired or are missing; a missing file is found by the decoder)."""
        plain = [d for d in deliveries if not d.entry.window]
        blobs: list[Any] = self.redis.mget([self.keys.blob(d.entry.clip_id) for d in plain])
        found = dict(zip((d.entry_id for d in plain), blobs, strict=True)) if plain else {}
        return [
            upload_path(blob_dir, d.entry.upload) if d.entry.window else found[d.entry_id]
            for d in deliveries
        ]

    def clip_states(self, deliveries: list[Delivery]) -> list[tuple[str, int]]:
        """-> [(state, trained)]: the clip's state and the deliveries that ended in an update."""
        pipe = self.redis.pipeline(transaction=False)
        for d in deliveries:
            pipe.hmget(self.keys.clip(d.entry.clip_id), ["state", "trained"])
        return [(_text(s) if s else "", int(t or 0)) for s, t in pipe.execute()]

    # ---- publishing, acking, dead-lettering ---------------------------------------------
    def publish_many(self, items: list[tuple[Delivery, wire.Embedding]]) -> None:
        """Write each clip's embedding (state ``embedded``) and hold its entry until the ack."""
        pipe = self.redis.pipeline(transaction=False)
        for delivery, embedding in items:
            cid = delivery.entry.clip_id
            self._publish(
                client=pipe,
                keys=[self.keys.clip(cid), self.keys.embedding(cid)],
                args=wire.flatten(embedding.to_fields()),
            )
        pipe.execute()
        self.held.update(d.entry_id for d, _ in items)

    def ack_many(self, items: list[tuple[Delivery, str]]) -> list[bool]:
        """Set each clip's final state (learned | probed | a duplicate's own) and ack it.

        One round trip; each script is atomic on its own, and a retry after an outage is
        harmless (a second ack of an entry is a no-op). Uploads whose last window this
        settled are in ``finished_uploads`` afterwards (their files can go)."""
        pipe = self.redis.pipeline(transaction=False)
        for delivery, state in items:
            cid = delivery.entry.clip_id
            self._ack(
                client=pipe,
                keys=[
                    self.keys.stream,
                    self.keys.clip(cid),
                    self.keys.backlog,
                    self.keys.blob(cid),
                    self._upload_key(delivery),
                ],
                args=[wire.GROUP, delivery.entry_id, state, delivery.deliveries],
            )
        answers = pipe.execute()
        self._note_finished(d for (d, _), a in zip(items, answers, strict=True) if a == 2)
        self.held.difference_update(d.entry_id for d, _ in items)
        return [bool(a) for a in answers]

    def _upload_key(self, delivery: Delivery) -> str:
        """The hash of a window's upload; "" (no key) for a plain clip."""
        return self.keys.clip(delivery.entry.upload) if delivery.entry.window else ""

    def _note_finished(self, deliveries: Iterable[Delivery]) -> None:
        self.finished_uploads.extend(d.entry.upload for d in deliveries)

    def dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Move an entry to the dead-letter stream with its reason, then ack it."""
        cid = delivery.entry.clip_id
        log.warning(
            "dead-lettering clip %s: %s", cid[:12], reason, extra={"clip_id": cid, "reason": reason}
        )
        acked = self._dead(
            keys=[
                self.keys.stream,
                self.keys.dead,
                self.keys.clip(cid),
                self.keys.backlog,
                self.keys.blob(cid),
                self._upload_key(delivery),
            ],
            args=[
                wire.GROUP,
                delivery.entry_id,
                reason[:500],
                delivery.deliveries,
                self.dead_blob_ttl_s,
                *wire.flatten(delivery.entry.to_fields()),
            ],
        )
        if acked == 2:
            self._note_finished([delivery])
        return bool(acked)

    # ---- announcing ---------------------------------------------------------------------
    def heartbeat(self, model: dict[str, Any]) -> None:
        """Announce liveness (for /readyz) and publish the model's version."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.keys.workers, {self.consumer: time.time()})
        if model:
            pipe.hset(self.keys.model, mapping=cast(Any, model))
        pipe.execute()

    def published_generation(self) -> int:
        """The newest generation any worker published (docs/versions.md)."""
        value = self.redis.hget(self.keys.model, "version")
        return wire.ModelVersion.parse(_text(value)).generation if value else 0

    def depths(self) -> tuple[int, int, int]:
        """(backlog, pending for the group, dead letters)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.backlog)
        pipe.xpending(self.keys.stream, wire.GROUP)
        pipe.xlen(self.keys.dead)
        backlog, pending, dead = pipe.execute()
        return int(backlog or 0), int(pending["pending"]), int(dead)

    # ---- operator control ---------------------------------------------------------------
    def read_control(self) -> wire.Control:
        """What an operator asked (pause, a rollback), read every iteration."""
        return wire.Control.from_fields(cast(dict, self.redis.hgetall(self.keys.control)))

    def finish_rollback(self, request_id: str, result: str) -> None:
        """Answer a rollback request: ``result`` (JSON) stays as the last one's outcome."""
        script = self.redis.register_script(wire.FINISH_ROLLBACK_SCRIPT)
        script(keys=[self.keys.control], args=[request_id, result])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
