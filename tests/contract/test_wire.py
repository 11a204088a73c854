"""The wire format both processes share."""

import pytest

from contract import wire
from tests.queueing import LIMITS, dead_letter, deliver, enqueue


def test_embedding_round_trip_keeps_float32_values():
    emb = wire.Embedding([0.1, -2.5, 3.0], [1.0, 0.0, -1.0], "2.7", 9, "flava", 12.25)
    back = wire.Embedding.from_fields(
        {
            k.encode(): (v if isinstance(v, bytes) else v.encode())
            for k, v in emb.to_fields().items()
        }
    )
    assert back.audio == pytest.approx([0.1, -2.5, 3.0], abs=1e-7)
    assert (back.video, back.model_version, back.step, back.method) == (
        [1.0, 0.0, -1.0],
        "2.7",
        9,
        "flava",
    )


def test_model_versions_order_by_generation_then_updates():
    v = wire.ModelVersion.parse
    assert v("3.1520") == wire.ModelVersion(3, 1520) and str(v("3.1520")) == "3.1520"
    assert v("2.900") < v("2.1000") < v("3.10")  # numeric, and N may restart lower in G+1
    assert v(17) == v("17") == wire.ModelVersion(0, 17)  # written before generations existed
    for bad in ("", "1.2.3", "a.1", "-1.2"):
        with pytest.raises(ValueError, match="G.N"):
            v(bad)


def test_unpack_refuses_partial_floats():
    with pytest.raises(ValueError, match="float32"):
        wire.unpack_vector(b"abcde")


def test_clip_entry_round_trip():
    entry = wire.ClipEntry("a" * 64, 123, "video/mp4", "seg-2", "probe", 5.5)
    fields = {k.encode(): v.encode() for k, v in entry.to_fields().items()}
    assert wire.ClipEntry.from_fields(fields) == entry


def test_keys_are_namespaced_by_prefix():
    keys = wire.Keys("p1")
    assert {keys.stream, keys.dead, keys.blob("x"), keys.embedding("x")} == {
        "p1:clips",
        "p1:dead",
        "p1:blob:x",
        "p1:emb:x",
    }


def test_backlog_bytes_key_is_the_one_the_ack_scripts_derive():
    keys = wire.Keys("p1")
    assert keys.backlog_bytes == keys.backlog + ":bytes"  # ACK/DEAD_LETTER: KEYS[i] .. ':bytes'


def test_queue_epoch_round_trip():
    epoch = wire.QueueEpoch.new()
    assert wire.EPOCH_PATTERN.match(epoch.id)
    back = wire.QueueEpoch.decode(epoch.encode().encode())
    assert back.id == epoch.id and back.created_at == pytest.approx(epoch.created_at, abs=1e-3)


def test_ingest_counts_bytes_and_a_dead_letter_releases_them(client, prefix):
    keys = wire.Keys(prefix)
    first = enqueue(client, keys, b"a" * 1000)
    enqueue(client, keys, b"b" * 300)
    assert (int(client.get(keys.backlog)), int(client.get(keys.backlog_bytes))) == (2, 1300)
    ids = deliver(client, keys)
    assert dead_letter(client, keys, first, ids[first], "UndecodableMedia: test") == 1
    assert dead_letter(client, keys, first, ids[first], "UndecodableMedia: test") == 0  # once
    assert (int(client.get(keys.backlog)), int(client.get(keys.backlog_bytes))) == (1, 300)


def test_release_never_drives_the_byte_counter_negative(client, prefix):
    keys = wire.Keys(prefix)
    cid = enqueue(client, keys, b"c" * 500)
    client.delete(keys.backlog_bytes)  # as if queued before the byte counter existed
    ids = deliver(client, keys)
    assert dead_letter(client, keys, cid, ids[cid], "test") == 1
    assert int(client.get(keys.backlog_bytes)) == 0


def test_ingest_refuses_past_the_byte_limit_and_writes_nothing(client, prefix):
    keys = wire.Keys(prefix)
    enqueue(client, keys, b"a" * 1000)
    entry = wire.ClipEntry("f" * 64, 200, "video/mp4")
    limits = wire.IngestLimits(blob_ttl_s=60, max_backlog=100, max_backlog_bytes=1100)
    outcome, detail, epoch = client.register_script(wire.INGEST_SCRIPT)(
        *wire.ingest_call(keys, entry, b"f" * 200, limits)
    )
    assert (outcome, detail) == (b"full_bytes", b"1000") and epoch
    assert client.xlen(keys.stream) == 1 and not client.exists(keys.clip("f" * 64))


def test_a_dead_clip_is_accepted_again_and_others_are_duplicates(client, prefix):
    keys = wire.Keys(prefix)
    cid = enqueue(client, keys, b"d" * 100)
    ids = deliver(client, keys)
    dead_letter(client, keys, cid, ids[cid], "decoding took longer than 60 s")
    again = enqueue(client, keys, b"d" * 100)  # asserts "queued"
    state = client.hgetall(keys.clip(again))
    assert state[b"state"] == b"queued" and b"reason" not in state
    assert state[b"entry_id"].decode() != ids[cid]
    outcome, detail, _ = client.register_script(wire.INGEST_SCRIPT)(
        *wire.ingest_call(keys, wire.ClipEntry(cid, 100, "video/mp4"), b"d" * 100, LIMITS)
    )
    assert (outcome, detail) == (b"duplicate", b"queued")


def test_the_first_ingest_creates_the_epoch_and_later_ones_keep_it(client, prefix):
    keys = wire.Keys(prefix)
    enqueue(client, keys, b"e1")
    first = wire.QueueEpoch.decode(client.get(keys.epoch))
    enqueue(client, keys, b"e2")
    assert wire.QueueEpoch.decode(client.get(keys.epoch)) == first


def test_an_ack_releases_the_bytes(client, prefix):
    keys = wire.Keys(prefix)
    cid = enqueue(client, keys, b"a" * 1000)
    ids = deliver(client, keys)
    ack = client.register_script(wire.ACK_SCRIPT)
    ack_keys = [keys.stream, keys.clip(cid), keys.backlog, keys.blob(cid)]
    assert ack(keys=ack_keys, args=[wire.GROUP, ids[cid], "learned", 1]) == 1
    assert ack(keys=ack_keys, args=[wire.GROUP, ids[cid], "learned", 1]) == 0  # once only
    assert (int(client.get(keys.backlog)), int(client.get(keys.backlog_bytes))) == (0, 0)
