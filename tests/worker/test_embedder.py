"""The embedder on a real Redis with real encoded clips: POST /embed end to end, hot reload,
pinned versions, dynamic batching, errors, and a `flava embedder` process."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from contract import wire
from flava.procs import spawn, terminate
from service.app import create_app
from service.settings import ApiSettings
from tests.queueing import enqueue, stream_clips
from worker.core.learner import LearnerConfig, build_learner
from worker.core.media import decode_clip
from worker.core.model import preset
from worker.embedder import Embedder, embed_clips
from worker.models import ModelPublisher, PublishConfig, load_model
from worker.runner import Worker
from worker.settings import EmbedderSettings


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    return stream_clips(4, seed=3)


@pytest.fixture
def models_dir(tmp_path) -> str:
    return str(tmp_path / "models")


@pytest.fixture
def publish(client, prefix, models_dir):
    """publish(version, seed): a tiny learner's weights (by seed) published as version."""
    cfg = PublishConfig(models_dir, every=1, keep=5)

    def run(version: str, seed: int = 0) -> None:
        learner = build_learner("finetune", preset("tiny"), LearnerConfig(seed=seed))
        pub = ModelPublisher(cfg, client, wire.Keys(prefix), "finetune", "tiny")
        assert pub.maybe_publish(learner, version, 0)
        pub.flush()

    return run


@pytest.fixture
def embedder_settings(redis_url, prefix, models_dir):
    def make(**overrides) -> EmbedderSettings:
        fields = dict(
            redis_url=redis_url,
            key_prefix=prefix,
            models_dir=models_dir,
            name="e1",
            block_ms=50,
            reload_check_s=0.0,
        )
        return EmbedderSettings(**(fields | overrides))

    return make


@pytest.fixture
def running(embedder_settings, client):
    """An embedder serving in a thread of this process."""
    stop = threading.Event()
    embedder = Embedder(embedder_settings(), client)
    thread = threading.Thread(target=embedder.run, args=(stop,), daemon=True)
    thread.start()
    yield embedder
    stop.set()
    thread.join(timeout=30)


@pytest.fixture
def api(redis_url, prefix):
    settings = ApiSettings(redis_url=redis_url, key_prefix=prefix, query_timeout_s=30)
    with TestClient(create_app(settings)) as c:
        yield c


def raw(api, clip: bytes, **params):
    return api.post("/embed", content=clip, params=params, headers={"Content-Type": "video/mp4"})


def direct(models_dir: str, version: str, clip: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding of ``clip`` by ``version``, computed here without Redis or the API."""
    loaded = load_model(models_dir, version)
    emb_a, emb_v = embed_clips(loaded, [decode_clip(clip, loaded.media)])
    return emb_a[0], emb_v[0]


def close(answer: dict, expected: tuple[torch.Tensor, torch.Tensor], row: int = 0) -> bool:
    got = answer["embeddings"][row]
    return all(
        torch.allclose(torch.tensor(got[m]), e, atol=1e-4)
        for m, e in zip(("audio", "video"), expected, strict=True)
    )


def wait_ready(api, clip: bytes, timeout: float = 60.0):
    """POST until an embedder answers (it starts in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        r = raw(api, clip)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_query_embeds_with_newest_model_and_learns_nothing(
    publish, running, api, clips, client, prefix, models_dir
):
    publish("1.1")
    r = wait_ready(api, clips[0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_version"], body["count"], body["dim"]) == ("1.1", 1, 192)
    assert body["trained_on"] is False and body["served_by"] == "e1"
    assert close(body, direct(models_dir, "1.1", clips[0]))
    keys = wire.Keys(prefix)
    assert not client.exists(keys.stream, keys.clip(wire_id(clips[0])), keys.monitor)
    assert client.xlen(keys.queries) == 0  # answered requests are deleted


def wire_id(clip: bytes) -> str:
    import hashlib

    return hashlib.sha256(clip).hexdigest()


def test_batch_pinned_version_and_hot_reload(publish, running, api, clips, models_dir):
    publish("1.1", seed=0)
    files = [("file", (f"c{i}.mp4", c, "video/mp4")) for i, c in enumerate(clips[:3])]
    first = wait_ready(api, clips[0])
    assert first.status_code == 200, first.text
    batch = api.post("/embed", files=files).json()
    assert (batch["model_version"], batch["count"]) == ("1.1", 3)
    assert close(batch, direct(models_dir, "1.1", clips[2]), row=2)
    publish("1.2", seed=1)
    deadline = time.monotonic() + 30
    while (newest := raw(api, clips[0]).json())["model_version"] != "1.2":
        assert time.monotonic() < deadline, "the new version was not loaded"
        time.sleep(0.1)
    assert close(newest, direct(models_dir, "1.2", clips[0]))
    pinned = raw(api, clips[0], version="1.1").json()
    assert pinned["model_version"] == "1.1" and close(pinned, direct(models_dir, "1.1", clips[0]))
    assert not close(pinned, direct(models_dir, "1.2", clips[0]))  # the versions differ
    assert raw(api, clips[0], version="7.7").status_code == 404


def queue_requests(client, prefix, clips, n: int, **kw) -> list[str]:
    keys = wire.Keys(prefix)
    ids = []
    for i in range(n):
        request = wire.QueryRequest.new([clips[i % len(clips)]], kw.get("version", ""), 30)
        client.xadd(keys.queries, dict(request.to_fields()))
        ids.append(request.request_id)
    return ids


def replies(client, prefix, ids) -> list[wire.QueryReply]:
    keys = wire.Keys(prefix)
    return [wire.QueryReply.decode(client.lpop(keys.reply(i))) for i in ids]


@pytest.mark.parametrize(("max_batch", "calls"), [(32, 1), (3, 3), (1, 8)])
def test_dynamic_batching_serves_waiting_requests_in_fewer_model_calls(
    publish, embedder_settings, client, prefix, clips, max_batch, calls
):
    publish("1.1")
    embedder = Embedder(embedder_settings(max_batch=max_batch), client)
    embedder.start()
    ids = queue_requests(client, prefix, clips, 8)
    while embedder.serve_once():
        pass
    assert embedder.calls == calls
    got = replies(client, prefix, ids)
    assert all(r.status == "ok" and len(r.audio) == 1 for r in got)
    assert max(r.batch_clips for r in got) == min(8, max_batch)
    assert len({r.call for r in got}) == calls


def test_embedder_errors_undecodable_unknown_version_expired(
    publish, embedder_settings, client, prefix, clips
):
    publish("1.1")
    embedder = Embedder(embedder_settings(), client)
    embedder.start()
    keys = wire.Keys(prefix)
    junk = wire.QueryRequest.new([clips[0], b"\x00not a clip" * 50], "", 30)
    pinned = wire.QueryRequest.new([clips[0]], "9.9", 30)
    expired = wire.QueryRequest.new([clips[0]], "", -1)
    for request in (junk, pinned, expired):
        client.xadd(keys.queries, dict(request.to_fields()))
    embedder.serve_once()
    bad, unknown = replies(client, prefix, [junk.request_id, pinned.request_id])
    assert (bad.status, bad.code, bad.index) == ("error", "undecodable", 1)
    assert unknown.code == "version_unknown" and "9.9" in unknown.reason
    assert client.llen(keys.reply(expired.request_id)) == 0 and embedder.calls == 0
    assert client.xlen(keys.queries) == 0


def test_api_answers_503_without_embedder_or_model_and_4xx_for_bad_input(
    publish, api, clips, client, prefix
):
    assert raw(api, clips[0]).json()["detail"]["code"] == "no_model"
    publish("1.1")
    r = raw(api, clips[0])
    assert r.status_code == 503 and r.json()["detail"]["code"] == "no_embedder"
    assert r.headers["Retry-After"]
    assert raw(api, b"junk" * 100).status_code == 415  # not a media container
    files = [("file", (f"{i}.mp4", clips[0], "video/mp4")) for i in range(33)]
    assert api.post("/embed", files=files).json()["detail"]["code"] == "too_many_clips"
    assert raw(api, clips[0], version="1.9").json()["detail"]["code"] == "version_unknown"


def test_api_times_out_with_503_and_withdraws_the_request(
    publish, redis_url, prefix, clips, client
):
    publish("1.1")
    keys = wire.Keys(prefix)
    client.zadd(keys.embedders, {"silent": time.time()})  # alive, but never answers
    settings = ApiSettings(redis_url=redis_url, key_prefix=prefix, query_timeout_s=0.5)
    with TestClient(create_app(settings)) as api:
        r = raw(api, clips[0])
    assert r.status_code == 503 and r.json()["detail"]["code"] == "embedder_timeout"
    assert client.xlen(keys.queries) == 0  # no embedder will spend time on it later


def test_models_lists_published_versions(publish, api, client, prefix):
    publish("1.1")
    publish("2.5")
    client.hset(wire.Keys(prefix).model, "version", "2.7")
    body = api.get("/models").json()
    assert body["newest"] == "2.5" and body["learner_version"] == "2.7"
    assert [m["version"] for m in body["models"]] == ["2.5", "1.1"]
    assert {"generation", "step", "published_at", "method"} <= set(body["models"][0])


def test_flava_embedder_process_serves_post_embed(
    publish, api, clips, tmp_path, redis_url, prefix, models_dir
):
    publish("1.1")
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_KEY_PREFIX": prefix,
        "FLAVA_MODELS_DIR": models_dir,
        "FLAVA_EMBEDDER_NAME": "proc",
    }
    proc = spawn(["--log-level", "warning", "embedder"], env, tmp_path / "embedder.log")
    try:
        r = wait_ready(api, clips[1], timeout=120)
        assert r.status_code == 200, (tmp_path / "embedder.log").read_text()[-2000:]
        assert r.json()["served_by"] == "proc"
        assert close(r.json(), direct(models_dir, "1.1", clips[1]))
    finally:
        assert terminate(proc, timeout=30) == 0


def test_learner_publishes_and_a_pinned_query_matches_its_stored_embedding(
    worker_settings, running, api, clips, client, prefix, models_dir
):
    settings = worker_settings(
        models_dir=models_dir, publish_every=1, embed_with="updated", method="finetune"
    )
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips]
    worker = Worker(settings, client)
    worker.start()
    assert worker.iterate().learned == 4
    worker.models.flush()
    version = worker.version
    stored = api.get("/embed", params={"clip_id": ids[0]}).json()
    assert stored["model_version"] == version
    queried = raw(api, clips[0], version=version).json()
    assert queried["model_version"] == version
    expected = (torch.tensor(stored["audio"]), torch.tensor(stored["video"]))
    assert close(queried, expected)  # the same weights, the same embedding
    other = api.get("/embed", params={"clip_id": ids[0], "version": "0.1"})
    assert other.status_code == 404 and other.json()["status"] == "other_version"
    assert version in other.json()["reason"]
    worker.settle()
    worker.pool.shutdown()
