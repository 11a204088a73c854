"""DELETE /clips/{clip_id} on a real Redis with real clips: queued, in flight, learned."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from contract import wire
from service.app import create_app
from service.settings import ApiSettings
from tests.queueing import dead_letter, deliver, enqueue, stream_clips
from worker.runner import Worker


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    return stream_clips(4, seed=5)


@pytest.fixture
def api(redis_url, prefix):
    with TestClient(create_app(ApiSettings(redis_url=redis_url, key_prefix=prefix))) as c:
        yield c


def clip_keys(keys: wire.Keys, cid: str) -> list[str]:
    return [keys.clip(cid), keys.blob(cid), keys.embedding(cid)]


def test_deleting_a_queued_clip_removes_entry_bytes_and_backlog(api, client, prefix, clips):
    keys = wire.Keys(prefix)
    cid = enqueue(client, keys, clips[0])
    r = api.delete(f"/clips/{cid}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["state_was"], body["removed_from_queue"], body["in_flight"]) == (
        "queued",
        True,
        False,
    )
    assert "stays in the weights" in body["note"]
    assert client.exists(*clip_keys(keys, cid)) == 0 and client.xlen(keys.stream) == 0
    assert int(client.get(keys.backlog)) == 0 and int(client.get(keys.backlog_bytes)) == 0
    assert api.get("/embed", params={"clip_id": cid}).status_code == 404
    assert api.delete(f"/clips/{cid}").status_code == 404  # gone already
    assert api.delete("/clips/not-a-clip-id").status_code == 422


def test_a_clip_deleted_in_flight_is_not_brought_back_by_its_dead_letter(
    api, client, prefix, clips
):
    keys = wire.Keys(prefix)
    cid = enqueue(client, keys, clips[0])
    entry = deliver(client, keys)[cid]  # a learner read it
    body = api.delete(f"/clips/{cid}").json()
    assert body["in_flight"] is True and "may still train" in body["note"]
    assert dead_letter(client, keys, cid, entry, "blob missing") == 0  # acked by the delete
    assert client.exists(keys.clip(cid)) == 0  # no ghost "dead" state
    assert int(client.get(keys.backlog)) == 0  # released once, not twice
    assert client.xpending(keys.stream, wire.GROUP)["pending"] == 0


def test_deleting_embedded_and_learned_clips_with_a_real_worker(
    worker_settings, api, client, prefix, clips
):
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips]
    worker = Worker(worker_settings(method="finetune", publish_every=0), client)
    worker.start()
    assert worker.iterate().learned == 4  # published (embedded), not yet durable
    in_flight = api.delete(f"/clips/{ids[0]}").json()
    assert (in_flight["state_was"], in_flight["in_flight"]) == ("embedded", True)
    assert worker.settle()  # the checkpoint's acks: the deleted clip's is a no-op
    worker.pool.shutdown()
    assert client.exists(*clip_keys(keys, ids[0])) == 0
    assert [client.hget(keys.clip(c), "state") for c in ids[1:]] == [b"learned"] * 3
    assert int(client.get(keys.backlog)) == 0 and int(client.get(keys.backlog_bytes)) == 0
    learned = api.delete(f"/clips/{ids[1]}").json()
    assert (learned["state_was"], learned["removed_from_queue"]) == ("learned", False)
    assert client.exists(*clip_keys(keys, ids[1])) == 0
    assert int(client.get(keys.backlog)) == 0
