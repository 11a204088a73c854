"""Long uploads through the API (service/uploads.py) on real Redis, learned by a real Worker:
cut into windows, stored as a file, embedded per window and pooled per version."""

from __future__ import annotations

import hashlib
import math

import pytest
import redis
from fastapi.testclient import TestClient

from contract import wire
from contract.index import VersionIndex
from contract.windows import upload_path, window_starts
from service.app import create_app
from service.settings import ApiSettings
from tests.worker.core.media_fixtures import ClipSpec, encode_clip

SECONDS = 14.0  # tiny: 5 windows of 2.56 s
WINDOWS = len(window_starts(SECONDS, 2.56, 2.56))


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    return encode_clip(ClipSpec(seconds=SECONDS, gop=10))


@pytest.fixture
def blob_dir(tmp_path):
    return tmp_path / "blobs"  # the worker_settings fixture's blob_dir


@pytest.fixture
def make_api(redis_url, prefix, blob_dir):
    clients = []

    def make(**overrides) -> TestClient:
        settings = ApiSettings(
            redis_url=redis_url,
            key_prefix=prefix,
            blob_dir=str(blob_dir),
            index_dir=str(blob_dir.parent / "index"),
            inputs_dir=str(blob_dir.parent / "inputs"),  # the worker_settings fixture's
            **overrides,
        )
        client = TestClient(create_app(settings))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def post(api: TestClient, data: bytes, content_type: str = "video/mp4"):
    return api.post("/ingest", content=data, headers={"Content-Type": content_type})


def test_a_long_upload_is_stored_as_a_file_and_queued_as_windows(
    make_api, long_clip, blob_dir, client, prefix
):
    api = make_api()
    r = post(api, long_clip)
    assert r.status_code == 202, r.text
    body = r.json()
    upload_id = hashlib.sha256(long_clip).hexdigest()
    assert body["clip_id"] == upload_id and body["windows"] == WINDOWS == 5
    assert body["span_s"] == body["stride_s"] == 2.56
    assert upload_path(blob_dir, upload_id).read_bytes() == long_clip
    assert not list(blob_dir.glob(".*"))  # no partial file left
    keys = wire.Keys(prefix)
    entries = [wire.ClipEntry.from_fields(f) for _, f in client.xrange(keys.stream)]
    assert [e.clip_id for e in entries] == [f"{upload_id}:{i}" for i in range(WINDOWS)]
    assert [e.start_s for e in entries] == window_starts(SECONDS, 2.56, 2.56)
    assert all(e.upload == upload_id and e.window for e in entries)
    assert int(client.get(keys.backlog)) == WINDOWS
    assert client.get(keys.blob(upload_id)) is None  # the bytes are not in Redis
    again = post(api, long_clip)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert int(client.get(keys.backlog)) == WINDOWS
    pending = api.get("/embed", params={"clip_id": upload_id})
    assert pending.status_code == 202
    assert pending.json()["windows_embedded"] == 0 and pending.json()["pooled"] is None


def test_windows_are_learned_embedded_pooled_and_the_file_removed(
    make_api, long_clip, blob_dir, redis_url, worker_settings, prefix
):
    from worker.reembed import reembed
    from worker.runner import Worker

    api = make_api()
    upload_id = post(api, long_clip).json()["clip_id"]
    client = redis.Redis.from_url(redis_url)
    worker = Worker(worker_settings(), client)
    worker.start()
    while worker.iterate() is not None:
        pass
    assert worker.settle()
    worker.iterate()  # the idle pass removes the files of finished uploads
    keys = wire.Keys(prefix)
    assert client.xlen(keys.dead) == 0 and int(client.get(keys.backlog)) == 0
    assert not upload_path(blob_dir, upload_id).exists()

    r = api.get("/embed", params={"clip_id": upload_id, "windows": "true", "limit": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "learned" and body["windows_learned"] == WINDOWS
    assert body["windows_embedded"] == WINDOWS and body["windows_dead"] == 0
    assert sum(v["windows"] for v in body["versions"]) == WINDOWS
    pooled = body["pooled"]
    assert pooled["model_version"] == body["versions"][0]["model_version"]
    assert pooled["windows"] == body["versions"][0]["windows"]
    assert math.isclose(sum(x * x for x in pooled["audio"]), 1.0, rel_tol=1e-5)
    assert [w["window"] for w in body["window_embeddings"]] == [0, 1]
    # the pool is the mean of exactly the windows of its version
    same = [
        api.get("/embed", params={"clip_id": f"{upload_id}:{i}"}).json() for i in range(WINDOWS)
    ]
    assert all(w["status"] == "ready" and w["state"] == "learned" for w in same)
    chosen = [w["video"] for w in same if w["model_version"] == pooled["model_version"]]
    assert pooled["source"] == "live"
    assert pooled["video"] == pytest.approx(unit_mean(chosen), abs=1e-5)

    # once one version embedded every window (flava reembed), the pool covers them all
    settings = worker_settings()
    indexed = reembed(settings.models_dir, settings.inputs_dir, blob_dir.parent / "index")
    full = api.get("/embed", params={"clip_id": upload_id}).json()["pooled"]
    assert (full["source"], full["windows"]) == ("index", WINDOWS)
    assert full["model_version"] == indexed.version
    index = VersionIndex.load(blob_dir.parent / "index", indexed.version)
    rows = [index.vector(f"{upload_id}:{i}", "audio").tolist() for i in range(WINDOWS)]
    assert full["audio"] == pytest.approx(unit_mean(rows), abs=1e-5)
    client.close()


def unit_mean(vectors: list[list[float]]) -> list[float]:
    """The mean of the unit vectors, as a unit vector."""
    units = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in vectors]
    mean = [sum(col) / len(units) for col in zip(*units, strict=True)]
    norm = math.sqrt(sum(x * x for x in mean))
    return [x / norm for x in mean]


def test_a_clip_of_one_example_stays_in_redis_and_over_its_limit_is_refused(make_api):
    api = make_api(max_body_bytes=20_000, max_backlog_bytes=20_000)
    short = encode_clip(ClipSpec(seconds=3.0, width=320, height=240))  # one example at tiny
    assert len(short) > 20_000
    r = post(api, short)
    assert r.status_code == 413 and r.json()["detail"]["code"] == "too_large"
    assert "FLAVA_MAX_BODY_BYTES" in r.json()["detail"]["reason"]


def test_an_upload_past_max_upload_bytes_is_refused_and_leaves_no_file(
    make_api, long_clip, blob_dir
):
    api = make_api(max_body_bytes=10_000, max_backlog_bytes=10_000, max_upload_bytes=20_000)
    assert len(long_clip) > 20_000
    r = post(api, long_clip)
    assert r.status_code == 413 and "FLAVA_MAX_UPLOAD_BYTES" in r.json()["detail"]["reason"]
    assert not blob_dir.exists() or not list(blob_dir.iterdir())


def test_an_upload_larger_than_the_backlog_is_admitted_into_a_queue_with_room(
    make_api, long_clip, client, prefix, blob_dir
):
    api = make_api(max_backlog=2)  # fewer than the upload's windows
    first = post(api, long_clip)
    assert first.status_code == 202 and first.json()["windows"] == WINDOWS
    other = encode_clip(ClipSpec(seconds=SECONDS, tone_hz=440.0, gop=10))
    refused = post(api, other)
    assert refused.status_code == 429 and refused.json()["detail"]["code"] == "backlog_full"
    assert not upload_path(blob_dir, hashlib.sha256(other).hexdigest()).exists()
    assert int(client.get(wire.Keys(prefix).backlog)) == WINDOWS


def test_deleting_an_upload_removes_its_windows_file_and_backlog(
    make_api, long_clip, client, prefix, blob_dir
):
    api = make_api()
    upload_id = post(api, long_clip).json()["clip_id"]
    r = api.delete(f"/clips/{upload_id}")
    assert r.status_code == 200, r.text
    assert r.json()["windows"] == r.json()["windows_removed_from_queue"] == WINDOWS
    keys = wire.Keys(prefix)
    assert client.xlen(keys.stream) == 0 and int(client.get(keys.backlog)) == 0
    assert not upload_path(blob_dir, upload_id).exists()
    assert api.get("/embed", params={"clip_id": upload_id}).status_code == 404
    assert api.get("/embed", params={"clip_id": f"{upload_id}:0"}).status_code == 404


def test_a_multipart_long_upload_under_the_body_limit_is_cut_into_windows(
    make_api, long_clip, blob_dir
):
    api = make_api()
    r = api.post("/ingest", files={"file": ("long.mp4", long_clip, "video/mp4")})
    assert r.status_code == 202 and r.json()["windows"] == WINDOWS
    assert upload_path(blob_dir, r.json()["clip_id"]).exists()
