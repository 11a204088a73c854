"""The worker's Redis side on a real Redis: delivery order, counts, finish, dead letters."""

from __future__ import annotations

import pytest
import redis

from contract import wire
from tests.queueing import enqueue
from worker.queue import ClipQueue


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_finish_writes_embedding_then_acks_and_frees_blob(client, prefix):
    keys = wire.Keys(prefix)
    q = ClipQueue(client, keys, "c1", min_idle_ms=60_000)
    q.ensure_group()
    cid = enqueue(client, keys, b"clip-1")
    (d,) = q.next_batch(10, 10)
    assert d.entry.clip_id == cid and d.deliveries == 1
    emb = wire.Embedding([1.0], [2.0], 1, 1, "finetune", 0.0)
    assert q.finish(d, emb, "learned") is True
    assert q.finish(d, emb, "learned") is False  # a second ack is a no-op
    assert client.hget(keys.clip(cid), "state") == b"learned"
    assert wire.Embedding.from_fields(client.hgetall(keys.embedding(cid))).video == [2.0]
    assert client.exists(keys.blob(cid)) == 0
    assert int(client.get(keys.backlog)) == 0
    assert q.depths() == (0, 0, 0)


def test_dead_letter_keeps_reason_and_entry(client, prefix):
    keys = wire.Keys(prefix)
    q = ClipQueue(client, keys, "c1", min_idle_ms=60_000)
    q.ensure_group()
    cid = enqueue(client, keys, b"clip-2")
    (d,) = q.next_batch(10, 10)
    assert q.dead_letter(d, "UndecodableMedia: junk")
    ((_, fields),) = client.xrange(keys.dead)
    assert fields[b"reason"] == b"UndecodableMedia: junk"
    assert fields[b"clip_id"] == cid.encode()
    assert client.hget(keys.clip(cid), "reason") == b"UndecodableMedia: junk"
    assert q.depths() == (0, 0, 1)


def test_restart_reclaims_own_pending_and_counts_deliveries(client, prefix):
    keys = wire.Keys(prefix)
    first = ClipQueue(client, keys, "c1", min_idle_ms=60_000)
    first.ensure_group()
    cid = enqueue(client, keys, b"clip-3")
    assert [d.entry.clip_id for d in first.next_batch(10, 10)] == [cid]
    # the consumer "dies" without acking; the same consumer name restarts
    again = ClipQueue(client, keys, "c1", min_idle_ms=60_000)
    assert again.claim_own_pending() == 1
    (d,) = again.next_batch(10, 10)
    assert d.entry.clip_id == cid and d.deliveries == 2
    assert again.next_batch(10, 10)[0].deliveries == 3  # re-read until finished
    again.finish(d, None, "learned")
    assert again.next_batch(10, 10) == []


def test_idle_entries_of_dead_consumers_are_reclaimed(client, prefix):
    keys = wire.Keys(prefix)
    dead = ClipQueue(client, keys, "dead-one", min_idle_ms=0)
    dead.ensure_group()
    cid = enqueue(client, keys, b"clip-4")
    dead.next_batch(10, 10)
    alive = ClipQueue(client, keys, "alive", min_idle_ms=0)
    (d,) = alive.next_batch(10, 10)
    assert d.entry.clip_id == cid and d.deliveries == 2


def test_heartbeat_publishes_model_and_liveness(client, prefix):
    keys = wire.Keys(prefix)
    q = ClipQueue(client, keys, "c9", min_idle_ms=1000)
    q.heartbeat({"version": 12, "step": 13})
    assert q.published_version() == 12
    assert client.zscore(keys.workers, "c9") > 0


def test_finish_many_acks_a_batch_in_one_round_trip(client, prefix):
    keys = wire.Keys(prefix)
    q = ClipQueue(client, keys, "c1", min_idle_ms=60_000)
    q.ensure_group()
    ids = [enqueue(client, keys, f"clip-{i}".encode()) for i in range(3)]
    batch = q.next_batch(10, 10)
    emb = wire.Embedding([1.0], [2.0], 4, 4, "flava", 0.0)
    assert q.finish_many([(d, emb, "learned") for d in batch]) == [True, True, True]
    assert q.finish_many([(batch[0], emb, "learned")]) == [False]  # already acked
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in ids)
    assert q.depths() == (0, 0, 0)
