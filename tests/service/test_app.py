"""The API against a real Redis and real encoded media (no mocks)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from contract import wire
from service.app import create_app
from service.settings import ApiSettings
from tests.queueing import dead_letter, deliver
from tests.worker.core.media_fixtures import ClipSpec, encode_clip

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_clip(ClipSpec(seconds=1.0))


@pytest.fixture
def settings(redis_url, prefix) -> ApiSettings:
    return ApiSettings(
        redis_url=redis_url, key_prefix=prefix, max_body_bytes=200_000, max_upload_bytes=200_000
    )


@pytest.fixture
def api(settings):
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def sync_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_ingest_queues_clip_with_claim_check(api, clip, sync_redis, prefix):
    r = api.post("/ingest?task=seg-1", content=clip, headers={"Content-Type": "video/mp4"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["clip_id"] == hashlib.sha256(clip).hexdigest()
    keys = wire.Keys(prefix)
    assert sync_redis.get(keys.blob(body["clip_id"])) == clip
    assert 0 < sync_redis.ttl(keys.blob(body["clip_id"])) <= 24 * 3600
    ((entry_id, fields),) = sync_redis.xrange(keys.stream)
    entry = wire.ClipEntry.from_fields(fields)
    assert (entry.clip_id, entry.size, entry.task) == (body["clip_id"], len(clip), "seg-1")
    assert sum(len(v) for v in fields.values()) < 500  # the bytes are not in the entry
    assert int(sync_redis.get(keys.backlog)) == 1


def test_reposting_same_bytes_is_not_queued_twice(api, clip, sync_redis, prefix):
    first = api.post("/ingest", content=clip, headers={"Content-Type": "video/mp4"})
    second = api.post("/ingest", content=clip, headers={"Content-Type": "video/mp4"})
    assert (first.status_code, second.status_code) == (202, 200)
    assert second.json()["status"] == "duplicate"
    assert sync_redis.xlen(wire.Keys(prefix).stream) == 1


def test_multipart_upload_with_task_field(api, clip):
    r = api.post("/ingest", files={"file": ("a.mp4", clip, "video/mp4")}, data={"task": "t7"})
    assert r.status_code == 202, r.text
    assert r.json()["task"] == "t7"


@pytest.mark.parametrize(
    ("content", "ctype", "status", "code"),
    [
        (b"", "video/mp4", 400, "empty_body"),
        (os.urandom(5000), "video/mp4", 415, "undecodable"),
        (b"hello world", "text/plain", 415, "unsupported_content_type"),
        (b"x" * 300_000, "video/mp4", 413, "too_large"),
    ],
)
def test_bad_bodies_get_specific_4xx(api, content, ctype, status, code, sync_redis, prefix):
    r = api.post("/ingest", content=content, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert r.json()["detail"]["code"] == code
    assert sync_redis.xlen(wire.Keys(prefix).stream) == 0


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        (ClipSpec(seconds=1.0, video_codec=None), "no_video"),
        (ClipSpec(seconds=1.0, audio_codec=None), "no_audio"),
    ],
)
def test_single_stream_files_are_refused(api, spec, code):
    r = api.post("/ingest", content=encode_clip(spec), headers={"Content-Type": "video/mp4"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["code"] == code


def test_truncated_file_is_refused(api, clip):
    r = api.post("/ingest", content=clip[: len(clip) // 3], headers={"Content-Type": "video/mp4"})
    assert r.status_code in (415, 422), r.text


def test_multipart_without_file_is_refused(api):
    r = api.post("/ingest", data={"task": "x"}, files={"other": ("a.txt", b"abc", "text/plain")})
    assert r.status_code == 422
    assert r.json()["detail"]["code"] == "no_file"


def test_embed_states(api, clip, sync_redis, prefix):
    unknown = api.get("/embed", params={"clip_id": "0" * 64})
    assert unknown.status_code == 404 and unknown.json()["status"] == "unknown"
    assert api.get("/embed", params={"clip_id": "nothex"}).status_code == 422
    cid = api.post("/ingest", content=clip, headers={"Content-Type": "video/mp4"}).json()["clip_id"]
    pending = api.get("/embed", params={"clip_id": cid})
    assert pending.status_code == 202 and pending.json()["status"] == "pending"
    emb = wire.Embedding(
        [0.5, -1.0], [2.0, 0.25], model_version="2.3", step=4, method="m", written_at=1.5
    )
    sync_redis.hset(wire.Keys(prefix).embedding(cid), mapping=emb.to_fields())
    sync_redis.hset(wire.Keys(prefix).clip(cid), "state", "learned")
    ready = api.get("/embed", params={"clip_id": cid}).json()
    assert ready["status"] == "ready"
    assert (ready["audio"], ready["video"]) == ([0.5, -1.0], [2.0, 0.25])
    assert ready["model_version"] == "2.3"


def test_backlog_limit_answers_429(redis_url, prefix, clip):
    settings = ApiSettings(redis_url=redis_url, key_prefix=prefix, max_backlog=1)
    with TestClient(create_app(settings)) as api:
        assert (
            api.post("/ingest", content=clip, headers={"Content-Type": "video/mp4"}).status_code
            == 202
        )
        other = encode_clip(ClipSpec(seconds=1.0, tone_hz=500.0))
        r = api.post("/ingest", content=other, headers={"Content-Type": "video/mp4"})
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) > 0


def test_token_required_when_configured(redis_url, prefix, clip):
    settings = ApiSettings(redis_url=redis_url, key_prefix=prefix, api_token=TOKEN)
    with TestClient(create_app(settings)) as api:
        assert api.post("/ingest", content=clip).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert api.get("/embed", params={"clip_id": "0" * 64}, headers=wrong).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "video/mp4"}
        assert api.post("/ingest", content=clip, headers=good).status_code == 202
        assert api.get("/healthz").status_code == 200
        assert api.get("/metrics").status_code == 200


def test_production_requires_token():
    with pytest.raises(ValueError, match="FLAVA_API_TOKEN"):
        ApiSettings(environment="production")


def test_readyz_needs_fresh_worker_heartbeat(api, sync_redis, prefix):
    import time

    assert api.get("/readyz").status_code == 503
    sync_redis.zadd(wire.Keys(prefix).workers, {"w1": time.time()})
    assert api.get("/readyz").json()["ready"] is True
    model = wire.Keys(prefix).model
    sync_redis.hset(model, mapping={"checkpoint_error": "OSError: disk full", "unacked": 12})
    body = api.get("/readyz").json()  # still ready: clips are accepted and kept
    assert (body["ready"], body["durable"], body["unacked"]) == (True, False, 12)
    assert body["checkpoint_error"] == "OSError: disk full"


def test_redis_down_answers_503(clip):
    settings = ApiSettings(redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as api:
        r = api.post("/ingest", content=clip, headers={"Content-Type": "video/mp4"})
    assert r.status_code == 503 and "Retry-After" in r.headers


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """One sample's value from a /metrics answer (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def test_metrics_count_outcomes(api, clip):
    def count(outcome: str) -> float:
        return sample(api.get("/metrics").text, "flava_ingest_requests_total", outcome=outcome)

    def post() -> int:
        return api.post("/ingest", content=clip, headers={"Content-Type": "video/mp4"}).status_code

    queued, duplicate = count("queued"), count("duplicate")
    assert post() == 202
    assert (count("queued"), count("duplicate")) == (queued + 1, duplicate)
    assert post() == 200  # the same bytes again: a duplicate, not queued twice
    assert (count("queued"), count("duplicate")) == (queued + 1, duplicate + 1)
    assert sample(api.get("/metrics").text, "flava_backlog_clips") == 1  # this test's prefix


def test_service_does_not_import_torch():
    code = "import sys, service.app; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.getcwd()).returncode == 0


def test_api_recovers_by_itself_after_redis_restart(redis_server, clip):
    settings = ApiSettings(redis_url=redis_server.url, key_prefix="outage")
    with TestClient(create_app(settings)) as api:
        assert (
            api.post("/ingest", content=clip, headers={"Content-Type": "video/mp4"}).status_code
            == 202
        )
        redis_server.stop()
        other = encode_clip(ClipSpec(seconds=1.0, tone_hz=700.0))
        down = api.post("/ingest", content=other, headers={"Content-Type": "video/mp4"})
        assert down.status_code == 503 and int(down.headers["Retry-After"]) > 0
        assert api.get("/embed", params={"clip_id": "0" * 64}).status_code == 503
        redis_server.start()
        up = api.post("/ingest", content=other, headers={"Content-Type": "video/mp4"})
        assert up.status_code == 202, up.text
        # the clip accepted before the restart survived it (append-only file)
        first = hashlib.sha256(clip).hexdigest()
        assert api.get("/embed", params={"clip_id": first}).json()["status"] == "pending"


def post(api, data: bytes):
    return api.post("/ingest", content=data, headers={"Content-Type": "video/mp4"})


def test_backlog_bytes_limit_answers_429_until_the_worker_releases_them(
    redis_url, prefix, clip, sync_redis
):
    other = encode_clip(ClipSpec(seconds=1.0, tone_hz=600.0))
    limit = len(clip) + len(other) // 2  # room for the first clip, not for both
    settings = ApiSettings(
        redis_url=redis_url, key_prefix=prefix, max_body_bytes=limit, max_backlog_bytes=limit
    )
    keys = wire.Keys(prefix)
    with TestClient(create_app(settings)) as api:
        first = post(api, clip)
        assert first.status_code == 202
        refused = post(api, other)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert refused.json()["detail"]["code"] == "backlog_bytes_full"
        assert str(len(clip)) in refused.json()["detail"]["reason"]
        cid = first.json()["clip_id"]
        dead_letter(sync_redis, keys, cid, deliver(sync_redis, keys)[cid], "test")  # a worker
        assert post(api, other).status_code == 202
    assert int(sync_redis.get(keys.backlog_bytes)) == len(other)


def test_backlog_bytes_below_the_body_limit_is_refused():
    with pytest.raises(ValueError, match="FLAVA_MAX_BACKLOG_BYTES"):
        ApiSettings(max_body_bytes=1000, max_backlog_bytes=999)


def test_a_dead_lettered_clip_is_accepted_again(api, clip, sync_redis, prefix):
    keys = wire.Keys(prefix)
    cid = post(api, clip).json()["clip_id"]
    dead_letter(sync_redis, keys, cid, deliver(sync_redis, keys)[cid], "decoding took too long")
    assert api.get("/embed", params={"clip_id": cid}).json()["status"] == "dead"
    again = post(api, clip)
    assert again.status_code == 202 and again.json()["status"] == "queued", again.text
    assert api.get("/embed", params={"clip_id": cid}).json()["status"] == "pending"
    sync_redis.hset(keys.clip(cid), "state", "learned")  # learned (or queued) stays a duplicate
    assert post(api, clip).json() | {"state": "learned"} == post(api, clip).json()
    assert post(api, clip).status_code == 200


def test_unknown_clip_names_the_queue_epoch(api, clip):
    epoch = post(api, clip).json()["queue_epoch"]
    assert wire.EPOCH_PATTERN.match(epoch)
    unknown = api.get("/embed", params={"clip_id": "1" * 64})
    assert unknown.status_code == 404
    assert (unknown.json()["queue_epoch"], unknown.json()["queue_reset"]) == (epoch, None)
    same = api.get("/embed", params={"clip_id": "1" * 64, "epoch": epoch})
    assert same.status_code == 404 and same.json()["queue_reset"] is False
    assert api.get("/embed", params={"clip_id": "1" * 64, "epoch": "xyz"}).status_code == 422


def test_a_clip_lost_in_a_data_losing_redis_restart_answers_410(redis_server, clip):
    settings = ApiSettings(redis_url=redis_server.url, key_prefix="reset")
    with TestClient(create_app(settings)) as api:
        accepted = post(api, clip).json()
        redis_server.stop()
        shutil.rmtree(redis_server.workdir)  # the append-only file is gone: Redis lost its data
        redis_server.start()
        query = {"clip_id": accepted["clip_id"], "epoch": accepted["queue_epoch"]}
        gone = api.get("/embed", params=query)
        assert gone.status_code == 410, gone.text
        assert gone.json()["status"] == "reset" and gone.json()["queue_reset"] is True
        assert "send it again" in gone.json()["reason"]
        assert gone.json()["queue_epoch"] != accepted["queue_epoch"]
        resent = post(api, clip)  # the client sends it again, into the new queue
        assert resent.status_code == 202
        assert resent.json()["queue_epoch"] == gone.json()["queue_epoch"]
