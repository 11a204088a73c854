"""The worker's Redis side on a real Redis: delivery order, counts, publish/ack, dead letters,
reclaiming only from gone consumers, a lost group, transient replies."""

from __future__ import annotations

import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from contract import wire
from contract.faults import lost_group
from tests.queueing import enqueue
from worker.queue import ClipQueue, stream_id, transient


def queue(client, prefix, consumer="c1", min_idle_ms=60_000) -> ClipQueue:
    q = ClipQueue(client, wire.Keys(prefix), consumer, min_idle_ms)
    q.ensure_group()
    return q


EMB = wire.Embedding([1.0], [2.0], "1.1", 1, "finetune", 0.0)


def test_publish_holds_the_entry_until_the_ack(client, prefix):
    keys = wire.Keys(prefix)
    q = queue(client, prefix)
    cid = enqueue(client, keys, b"clip-1")
    (d,) = q.next_batch(10, 10)
    assert d.entry.clip_id == cid and d.deliveries == 1
    q.publish_many([(d, EMB)])
    assert client.hget(keys.clip(cid), "state") == b"embedded"
    assert client.hget(keys.clip(cid), "trained") == b"1"
    assert wire.Embedding.from_fields(client.hgetall(keys.embedding(cid))).video == [2.0]
    assert q.depths() == (1, 1, 0)  # still pending: its update is not durable yet
    assert client.exists(keys.blob(cid)) == 1  # a crash re-delivers it, bytes included
    assert q.ack_many([(d, "learned")]) == [True]
    assert q.ack_many([(d, "learned")]) == [False]  # a second ack is a no-op
    assert client.hget(keys.clip(cid), "state") == b"learned"
    assert client.exists(keys.blob(cid)) == 0
    assert q.depths() == (0, 0, 0)


def test_a_reread_never_hands_out_held_entries(client, prefix):
    keys = wire.Keys(prefix)
    q = queue(client, prefix)
    ids = [enqueue(client, keys, f"clip-h{i}".encode()) for i in range(3)]
    batch = q.next_batch(2, 10)
    q.publish_many([(d, EMB) for d in batch])
    q.reread_pending()  # as after a Redis outage
    assert [d.entry.clip_id for d in q.next_batch(10, 10)] == [ids[2]]  # only the new one
    assert q.next_batch(10, 10) == []
    assert {d.entry_id for d in batch} == q.held


def test_dead_letter_keeps_reason_and_entry(client, prefix):
    keys = wire.Keys(prefix)
    q = queue(client, prefix)
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
    first = queue(client, prefix)
    cid = enqueue(client, keys, b"clip-3")
    assert [d.entry.clip_id for d in first.next_batch(10, 10)] == [cid]
    # the consumer "dies" without acking; the same consumer name restarts
    again = ClipQueue(client, keys, "c1", min_idle_ms=60_000)
    assert again.claim_own_pending() == 1
    (d,) = again.next_batch(10, 10)
    assert d.entry.clip_id == cid and d.deliveries == 2
    assert again.next_batch(10, 10)[0].deliveries == 3  # re-read until finished
    again.ack_many([(d, "learned")])
    assert again.next_batch(10, 10) == []


def test_only_gone_consumers_are_reclaimed_from(client, prefix):
    keys = wire.Keys(prefix)
    other = queue(client, prefix, "other", min_idle_ms=0)
    cid = enqueue(client, keys, b"clip-4")
    other.next_batch(10, 10)
    other.heartbeat({})  # alive: its held tail is its own, however long it holds it
    alive = queue(client, prefix, "alive", min_idle_ms=60_000)
    assert alive.next_batch(10, 10) == []
    client.zadd(keys.workers, {"other": time.time() - 120})  # silent for 2 minutes: gone
    (d,) = alive.next_batch(10, 10)
    assert d.entry.clip_id == cid and d.deliveries == 2


def test_heartbeat_publishes_model_and_liveness(client, prefix):
    keys = wire.Keys(prefix)
    q = ClipQueue(client, keys, "c9", min_idle_ms=1000)
    q.heartbeat({"version": "3.12", "step": 13})
    assert q.published_generation() == 3
    assert client.zscore(keys.workers, "c9") > 0


def test_ack_many_acks_a_batch_in_one_round_trip(client, prefix):
    keys = wire.Keys(prefix)
    q = queue(client, prefix)
    ids = [enqueue(client, keys, f"clip-{i}".encode()) for i in range(3)]
    batch = q.next_batch(10, 10)
    q.publish_many([(d, EMB) for d in batch])
    assert q.ack_many([(d, "learned") for d in batch]) == [True, True, True]
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in ids)
    assert q.depths() == (0, 0, 0) and q.held == set()


def test_a_lost_group_is_recreated_and_held_entries_forgotten(client, prefix):
    keys = wire.Keys(prefix)
    q = queue(client, prefix)
    enqueue(client, keys, b"clip-5")
    (d,) = q.next_batch(10, 10)
    q.publish_many([(d, EMB)])
    client.delete(keys.stream, keys.clip(d.entry.clip_id))  # Redis lost its data
    with pytest.raises(ResponseError) as err:
        q.next_batch(10, 10)
    assert lost_group(err.value)
    q.recover_group()
    assert q.held == set() and q.next_batch(10, 10) == []
    assert q.ack_many([(d, "learned")]) == [False]
    assert not client.exists(keys.clip(d.entry.clip_id))  # no half clip hash left behind


def test_transient_replies_and_stream_ids():
    assert transient(RedisConnectionError("down"))
    assert transient(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert transient(ReadOnlyError("You can't write against a read only replica."))
    assert transient(ResponseError("BUSY Redis is busy running a script."))
    assert not transient(ResponseError("WRONGTYPE Operation against a key"))
    pipelined = "Command # 1 (EVALSHA ...) of pipeline caused error: 'NOGROUP No such key'"
    assert lost_group(ResponseError(pipelined)) and not transient(ResponseError(pipelined))
    # ids of one millisecond: "…-10" sorts before "…-9" as strings, after it as ids
    ids = ["1700000000000-10", "1700000000000-9", "1699999999999-50"]
    assert min(ids, key=stream_id) == "1699999999999-50"
    assert max(ids, key=stream_id) == "1700000000000-10" != max(ids)


def test_delivery_counts_with_many_entries_in_one_millisecond(client, prefix):
    keys = wire.Keys(prefix)
    q = queue(client, prefix)
    ms = int(time.time() * 1000)
    for seq in range(12):  # ids ms-0 .. ms-11 share a millisecond
        entry = wire.ClipEntry(f"{seq:064x}", 1, "video/mp4")
        client.hset(keys.clip(entry.clip_id), "state", "queued")
        client.xadd(keys.stream, entry.to_fields(), id=f"{ms}-{seq}")
    batch = q.next_batch(12, 10)
    assert [d.deliveries for d in batch] == [1] * 12
