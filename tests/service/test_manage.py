"""The management routes on a real Redis, with a real Worker (tiny learner, real MP4 clips)
doing what the operator asks: GET /model, /monitor, /dead, POST /dead/{id}/retry,
/model/pause, /model/resume, /model/rollback."""

from __future__ import annotations

import hashlib
import json

import pytest
from fastapi.testclient import TestClient

from contract import wire
from service.app import create_app
from service.settings import ApiSettings
from tests.queueing import enqueue
from worker.core.synthetic import StreamConfig, make_clip, segment_specs
from worker.runner import Worker

TOKEN = "ops-token"


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    cfg = StreamConfig(num_segments=1)
    return [make_clip(s, cfg) for s in segment_specs(cfg, 0, 10, seed=5)]


@pytest.fixture
def api(redis_url, prefix, tmp_path):
    settings = ApiSettings(
        redis_url=redis_url, key_prefix=prefix, api_token=TOKEN, blob_dir=str(tmp_path / "blobs")
    )
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


@pytest.fixture
def worker(worker_settings, client):
    w = Worker(worker_settings(decode_processes=1, heartbeat_s=0.0), client)
    w.start()
    yield w
    w.pool.shutdown()


def test_management_routes_need_the_token(api):
    for method, path in [
        ("GET", "/model"),
        ("GET", "/monitor"),
        ("GET", "/dead"),
        ("POST", f"/dead/{'0' * 64}/retry"),
        ("POST", "/model/pause"),
        ("POST", "/model/resume"),
        ("POST", "/model/rollback?version=1.1"),
    ]:
        assert api.request(method, path, headers={"Authorization": "Bearer x"}).status_code == 401


def test_a_dead_letter_cursor_past_a_stream_id_is_refused_with_a_reason(api):
    """Both halves of a stream id are unsigned 64-bit: a larger cursor fits the pattern but
    made Redis refuse XREVRANGE, answered 500 (found by tests/service/test_schema.py)."""
    for cursor in ("0-20000000000000000000", "18446744073709551616-0"):
        r = api.get("/dead", params={"before": cursor})
        assert r.status_code == 422, r.text
        assert r.json()["detail"]["code"] == "bad_cursor"
    last = api.get("/dead", params={"before": "18446744073709551615-18446744073709551615"})
    assert last.status_code == 200 and last.json()["letters"] == []


def test_model_and_monitor_before_any_worker(api):
    assert api.get("/model").json()["detail"]["code"] == "no_model"
    assert api.get("/monitor").json()["detail"]["code"] == "no_monitor"


def test_model_and_monitor_as_the_worker_publishes_them(api, worker, client, clips, prefix):
    keys = wire.Keys(prefix)
    for c in clips[:4]:
        enqueue(client, keys, c)
    assert worker.iterate().learned == 4
    assert worker.settle()
    worker.heartbeat(force=True)
    body = api.get("/model").json()
    assert (body["version"], body["generation"], body["step"]) == ("1.1", 1, 1)
    assert (body["method"], body["preset"]) == (worker.settings.method, worker.settings.preset)
    assert body["selection"]["on"] == (worker.learner.selection_state().selection_step is not None)
    assert 0 <= body["selection"]["avm_accuracy_ema"] <= 1
    assert body["durable"] and body["unacked"] == 0
    assert body["durable_versions"] == ["1.1"]
    assert (body["paused"], body["pause_requested"], body["last_rollback"]) == (False, False, None)
    assert 0 <= body["worker_heartbeat_age_s"] < 30
    worker.monitor.publish(worker.counters.step, worker.version)
    summary = api.get("/monitor").json()
    assert summary == json.loads(client.get(keys.monitor))  # what the worker published
    assert (summary["step"], summary["version"]) == (1, "1.1")


def test_dead_letters_paged_with_reasons_and_retried(api, worker, client, clips, prefix):
    keys = wire.Keys(prefix)
    junk = [b"not a video %d" % i for i in range(3)]
    ids = [enqueue(client, keys, j) for j in junk]
    good = enqueue(client, keys, clips[0])
    report = worker.iterate()
    assert (report.dead, report.learned) == (3, 1)
    first = api.get("/dead", params={"limit": 2}).json()
    assert first["total"] == 3 and len(first["letters"]) == 2 and first["next"]
    rest = api.get("/dead", params={"limit": 2, "before": first["next"]}).json()
    assert rest["next"] is None
    nothing_before = api.get("/dead", params={"before": "0-0"})  # was a 500 (schemathesis)
    assert nothing_before.status_code == 200 and nothing_before.json()["letters"] == []
    letters = first["letters"] + rest["letters"]
    assert [x["clip_id"] for x in letters] == ids[::-1]  # newest first, each once
    assert all(x["reason"] and x["state"] == "dead" and x["retryable"] for x in letters)
    assert letters[0]["size"] == len(junk[2]) and letters[0]["deliveries"] == 1

    backlog = int(client.get(keys.backlog))
    r = api.post(f"/dead/{ids[0]}/retry")
    assert r.status_code == 202, r.text
    assert client.hget(keys.clip(ids[0]), "state") == b"queued"
    assert client.hget(keys.clip(ids[0]), "reason") is None
    assert int(client.get(keys.backlog)) == backlog + 1
    entry = wire.ClipEntry.from_fields(client.xrange(keys.stream, min=r.json()["entry_id"])[0][1])
    assert (entry.clip_id, entry.size) == (ids[0], len(junk[0]))
    assert client.ttl(keys.blob(ids[0])) > 3600  # its bytes live as long as a fresh clip's
    again = api.post(f"/dead/{ids[0]}/retry")
    assert (again.status_code, again.json()["detail"]["code"]) == (409, "not_dead")
    report = worker.iterate()  # the worker takes it again; junk it is, dead it goes
    assert report.dead == 1 and client.hget(keys.clip(ids[0]), "state") == b"dead"

    client.delete(keys.blob(ids[1]))  # FLAVA_DEAD_BLOB_TTL_S passed
    gone = api.post(f"/dead/{ids[1]}/retry")
    assert (gone.status_code, gone.json()["detail"]["code"]) == (409, "bytes_gone")
    page = api.get("/dead", params={"limit": 10}).json()["letters"]
    assert [x["retryable"] for x in page if x["clip_id"] == ids[1]] == [False]
    assert api.post(f"/dead/{good}/retry").json()["detail"]["code"] == "not_dead"
    unknown = api.post(f"/dead/{hashlib.sha256(b'never').hexdigest()}/retry")
    assert unknown.status_code == 404


def test_dead_blob_is_dropped_at_once_when_retention_is_zero(api, worker_settings, client, prefix):
    w = Worker(worker_settings(decode_processes=1, dead_blob_ttl_s=0), client)
    w.start()
    try:
        cid = enqueue(client, wire.Keys(prefix), b"junk")
        assert w.iterate().dead == 1
    finally:
        w.pool.shutdown()
    assert client.exists(wire.Keys(prefix).blob(cid)) == 0
    assert api.get("/dead").json()["letters"][0]["retryable"] is False


def test_pause_stops_batches_but_acks_and_heartbeats_go_on(api, worker, client, clips, prefix):
    keys = wire.Keys(prefix)
    first = [enqueue(client, keys, c) for c in clips[:4]]
    assert worker.iterate().learned == 4  # published, waiting for a checkpoint
    assert api.post("/model/pause").json()["pause_requested"] is True
    later = [enqueue(client, keys, c) for c in clips[4:8]]
    beat = client.zscore(keys.workers, worker.settings.consumer)
    for _ in range(3):  # paused: the idle checkpoint acks the first batch; nothing is taken
        assert worker.iterate() is None
        worker.checkpoints.wait()
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in first)
    assert all(client.hget(keys.clip(c), "state") == b"queued" for c in later)
    assert worker.counters.step == 1
    assert client.zscore(keys.workers, worker.settings.consumer) > beat
    body = api.get("/model").json()
    assert (body["paused"], body["pause_requested"]) == (True, True)
    assert api.post("/model/resume").status_code == 202
    assert worker.iterate().learned == 4 and worker.counters.step == 2
    assert api.get("/model").json()["paused"] is False


def test_rollback_to_a_durable_checkpoint_under_a_new_generation(
    api, worker, client, clips, prefix
):
    keys = wire.Keys(prefix)
    for c in clips[:4]:
        enqueue(client, keys, c)
    worker.iterate()
    assert worker.settle()  # 1.1 durable
    weights = {k: v.clone() for k, v in worker.learner.model.state_dict().items()}
    for c in clips[4:8]:
        enqueue(client, keys, c)
    worker.iterate()  # 1.2, published only
    worker.heartbeat(force=True)
    assert api.get("/model").json()["durable_versions"] == ["1.1"]
    missing = api.post("/model/rollback", params={"version": "1.2"})
    assert (missing.status_code, missing.json()["detail"]["code"]) == (404, "not_durable")
    asked = api.post("/model/rollback", params={"version": "1.1"})
    assert asked.status_code == 202, asked.text
    busy = api.post("/model/rollback", params={"version": "1.1"})
    assert (busy.status_code, busy.json()["detail"]["code"]) == (409, "rollback_pending")
    assert api.get("/model").json()["rollback_pending"]["version"] == "1.1"

    assert worker.iterate() is None  # rolled back at the top of the loop; the stream is empty
    body = api.get("/model").json()
    done = body["last_rollback"]
    assert (done["id"], done["state"], done["from_version"]) == (asked.json()["id"], "done", "1.2")
    assert done["new_version"] == body["version"] == worker.version == "2.1"  # never "1.x"
    assert body["rollback_pending"] is None
    assert body["durable_versions"][-1] == "2.1"  # the rolled-back weights, checkpointed
    now = worker.learner.model.state_dict()
    assert all(bool((now[k] == v).all()) for k, v in weights.items())
    # the clips learned by 1.2 were acked (durable in 1.2's checkpoint) before going back
    assert worker.queue.depths() == (0, 0, 0)
    for c in clips[8:10]:
        enqueue(client, keys, c)
    assert worker.iterate().learned == 2 and worker.version == "2.2"  # learned on top of 1.1
