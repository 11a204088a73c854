"""Kept inputs -> `flava reembed` -> /search, on real Redis with a real Worker, a published
model and an embedder: one version's space end to end."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from contract import index as vindex
from contract import wire
from service.app import create_app
from service.settings import ApiSettings
from tests.queueing import enqueue, stream_clips
from worker.core.media import decode_clip
from worker.embedder import Embedder, embed_clips
from worker.inputs import InputStore
from worker.models import load_model
from worker.reembed import reembed
from worker.runner import Worker
from worker.settings import EmbedderSettings

CLIPS = 6


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    return stream_clips(CLIPS, seed=5)


@pytest.fixture
def learned(clips, redis_url, prefix, worker_settings, tmp_path):
    """A worker that learned the clips, published a model and kept their inputs."""
    client = redis.Redis.from_url(redis_url)
    ids = [enqueue(client, wire.Keys(prefix), c, task="seg") for c in clips]
    settings = worker_settings(publish_every=1)
    worker = Worker(settings, client)
    worker.start()
    while worker.iterate() is not None:
        pass
    assert worker.settle()
    worker.models.flush()
    yield settings, ids
    client.close()


@pytest.fixture
def api(redis_url, prefix, learned, tmp_path):
    settings, _ = learned
    api_settings = ApiSettings(
        redis_url=redis_url,
        key_prefix=prefix,
        index_dir=str(tmp_path / "index"),
        inputs_dir=settings.inputs_dir,
        query_timeout_s=30,
    )
    with TestClient(create_app(api_settings)) as c:
        yield c


def test_the_worker_keeps_each_clips_decoded_inputs(learned, clips):
    settings, ids = learned
    kept = {k.clip_id: k for k in InputStore(settings.inputs_dir).scan(task="seg")}
    assert set(kept) == set(ids)
    media = settings and decode_clip(
        clips[0], load_model(settings.models_dir, _newest(settings)).media
    )
    assert torch.allclose(kept[ids[0]].clip.fbank, media.fbank, atol=2e-2)  # float16 kept
    assert kept[ids[0]].preset == "tiny"


def _newest(settings) -> str:
    from worker.reembed import newest_published

    return newest_published(settings.models_dir)


def test_reembed_indexes_every_kept_clip_in_one_versions_space(learned, clips, tmp_path):
    settings, ids = learned
    version = _newest(settings)
    result = reembed(settings.models_dir, settings.inputs_dir, tmp_path / "index")
    assert (result.version, result.count) == (version, CLIPS)
    index = vindex.VersionIndex.load(tmp_path / "index", version)
    loaded = load_model(settings.models_dir, version)
    emb_a, emb_v = embed_clips(loaded, [decode_clip(clips[2], loaded.media)])
    expected = vindex.unit_rows(emb_v.numpy())[0]
    assert np.allclose(index.vector(ids[2], "video"), expected, atol=2e-2)


def test_search_answers_from_the_newest_index_and_leaves_out_deleted_clips(learned, api, tmp_path):
    settings, ids = learned
    none = api.get("/search", params={"clip_id": ids[0]})
    assert none.status_code == 404 and none.json()["detail"]["code"] == "no_index"
    version = reembed(settings.models_dir, settings.inputs_dir, tmp_path / "index").version
    r = api.get("/search", params={"clip_id": ids[0], "direction": "a2v", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == version and body["indexed"] == CLIPS and body["search"] == "exact"
    hits = [h["clip_id"] for h in body["hits"]]
    assert len(hits) == 3 and ids[0] not in hits and set(hits) <= set(ids)
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    live = api.get("/embed", params={"clip_id": ids[0]}).json()
    assert live["model_version"] != version  # the learner embedded it before that version
    by_index = api.get("/embed", params={"clip_id": ids[0], "version": version})
    assert by_index.status_code == 200, by_index.text
    assert (by_index.json()["source"], by_index.json()["model_version"]) == ("index", version)
    index = vindex.VersionIndex.load(tmp_path / "index", version)
    assert np.allclose(by_index.json()["video"], index.vector(ids[0], "video"))
    not_there = api.get("/embed", params={"clip_id": ids[0], "version": "999.1"})
    assert not_there.status_code == 404 and not_there.json()["status"] == "other_version"
    unknown = api.get("/search", params={"clip_id": "e" * 64})
    assert unknown.status_code == 404 and unknown.json()["detail"]["code"] == "not_indexed"
    other = api.get("/search", params={"clip_id": ids[0], "version": "999.1"})
    assert other.status_code == 404 and other.json()["detail"]["code"] == "index_unknown"
    assert api.delete(f"/clips/{hits[0]}").status_code == 200
    again = api.get("/search", params={"clip_id": ids[0], "direction": "a2v", "k": 5})
    assert hits[0] not in [h["clip_id"] for h in again.json()["hits"]]
    assert not vindex.input_path(settings.inputs_dir, hits[0]).exists()  # not indexed again


def test_a_deleted_clip_leaves_search_at_once_though_its_row_stays_in_the_files(
    learned, api, redis_url, prefix, tmp_path
):
    """DELETE /clips tombstones the clip: searches still find k others (not k minus the
    deleted), it is no longer a query, and its tombstone is dropped once no index can hold
    it; before, hits were filtered after the search and the deleted clip stayed a query."""
    settings, ids = learned
    version = reembed(settings.models_dir, settings.inputs_dir, tmp_path / "index").version
    params = {"clip_id": ids[0], "direction": "a2v", "exact": True}
    before = [h["clip_id"] for h in api.get("/search", params={**params, "k": 4}).json()["hits"]]
    gone = before[0]
    assert api.delete(f"/clips/{gone}").status_code == 200
    assert gone in vindex.VersionIndex.load(tmp_path / "index", version).ids  # still on disk
    after = api.get("/search", params={**params, "k": 3}).json()["hits"]
    assert [h["clip_id"] for h in after] == before[1:]
    as_query = api.get("/search", params={"clip_id": gone})
    assert as_query.status_code == 404 and "deleted" in as_query.json()["detail"]["reason"]
    client, keys = redis.Redis.from_url(redis_url), wire.Keys(prefix)
    assert api.delete(f"/clips/{'e' * 64}").status_code == 404
    assert client.zscore(keys.deleted, "e" * 64) is None  # a delete that found nothing
    # the next full pass is made without it; an old tombstone goes at the next delete
    reembed(settings.models_dir, settings.inputs_dir, tmp_path / "index")
    assert gone not in vindex.VersionIndex.load(tmp_path / "index", version).ids
    client.zadd(keys.deleted, {"f" * 64: time.time() - 2 * 24 * 3600})
    other = next(cid for cid in ids[1:] if cid != gone)
    assert api.delete(f"/clips/{other}").status_code == 200
    assert client.zscore(keys.deleted, "f" * 64) is None
    assert client.zscore(keys.deleted, gone) is not None  # within the clocks' margin
    client.close()


def test_post_search_embeds_the_query_with_the_index_version(
    learned, api, clips, redis_url, prefix, tmp_path
):
    settings, ids = learned
    version = reembed(settings.models_dir, settings.inputs_dir, tmp_path / "index").version
    client = redis.Redis.from_url(redis_url)
    embedder_settings = EmbedderSettings(
        redis_url=redis_url,
        key_prefix=prefix,
        models_dir=settings.models_dir,
        name="e1",
        block_ms=50,
        reload_check_s=0.0,
    )
    stop = threading.Event()
    embedder = Embedder(embedder_settings, client)
    thread = threading.Thread(target=embedder.run, args=(stop,), daemon=True)
    thread.start()
    try:
        r = _post_search(api, clips[4])
    finally:
        stop.set()
        thread.join(timeout=30)
        client.close()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == version
    top = body["hits"][0]
    assert top["clip_id"] == ids[4] and top["score"] > 0.999  # the same clip, the same space


def _post_search(api, clip: bytes, timeout: float = 60.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = api.post(
            "/search",
            content=clip,
            params={"direction": "a2a", "k": 3},
            headers={"Content-Type": "video/mp4"},
        )
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_flava_reembed_command_indexes_the_kept_clips(learned, monkeypatch, tmp_path, capsys):
    from flava.cli import main

    settings, ids = learned
    monkeypatch.setenv("FLAVA_MODELS_DIR", settings.models_dir)
    monkeypatch.setenv("FLAVA_INPUTS_DIR", settings.inputs_dir)
    monkeypatch.setenv("FLAVA_INDEX_DIR", str(tmp_path / "cli-index"))
    assert main(["reembed", "--task", "seg"]) == 0
    version = _newest(settings)
    assert f"version {version}: {CLIPS} clips indexed" in capsys.readouterr().out
    assert sorted(vindex.VersionIndex.load(tmp_path / "cli-index", version).ids) == sorted(ids)
    assert main(["reembed", "--task", "other"]) == 0  # no clip of that task: an empty index
    assert len(vindex.VersionIndex.load(tmp_path / "cli-index", version)) == 0


def test_follow_appends_clips_that_land_and_moves_to_a_newer_version(
    learned, api, redis_url, prefix, worker_settings, tmp_path
):
    from worker.reembed import FollowConfig, Follower

    settings, ids = learned
    index_dir = tmp_path / "index"  # the api fixture's
    follower = Follower(
        settings.models_dir, settings.inputs_dir, index_dir, FollowConfig(refresh_s=3600, keep=1)
    )
    assert follower.step() == CLIPS  # the full pass
    first = follower.loaded.card.version
    assert follower.step() == 0  # nothing new

    client = redis.Redis.from_url(redis_url)
    late = [enqueue(client, wire.Keys(prefix), c, task="late") for c in stream_clips(2, seed=9)]
    worker = Worker(worker_settings(publish_every=1), client)  # restores, publishes anew
    worker.start()
    while worker.iterate() is not None:
        pass
    assert worker.settle()
    worker.models.flush()
    client.close()
    assert _newest(settings) != first

    assert follower.step() == 2  # appended with the index's own version, not the newer one
    index = vindex.VersionIndex.load(index_dir, first)
    assert len(index.parts) == 2 and sorted(index.parts[1].ids) == sorted(late)
    r = api.get("/search", params={"clip_id": late[0], "k": 20})
    assert r.status_code == 200 and r.json()["version"] == first
    assert r.json()["indexed"] == CLIPS + 2

    follower.cfg.refresh_s = 0.0  # due: a full pass with the newest version, the old one goes
    assert follower.step() == CLIPS + 2
    assert vindex.complete_versions(index_dir) == [_newest(settings)]
    r = api.get("/search", params={"clip_id": ids[1]})
    assert r.status_code == 200 and r.json()["version"] == _newest(settings)


def test_flava_search_command_against_a_real_server(
    learned, redis_url, prefix, tmp_path, capsys, monkeypatch
):
    import os

    from flava.cli import main
    from flava.procs import free_port, spawn, terminate, wait_until_ready

    settings, ids = learned
    version = reembed(settings.models_dir, settings.inputs_dir, tmp_path / "index").version
    port = free_port()
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_KEY_PREFIX": prefix,
        "FLAVA_INDEX_DIR": str(tmp_path / "index"),
        "FLAVA_API_TOKEN": "search-token",
    }
    proc = spawn(
        ["--log-level", "warning", "serve", "--port", str(port)], env, tmp_path / "api.log"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/healthz", 180, [proc], tmp_path / "api.log")
        monkeypatch.setenv("FLAVA_API_TOKEN", "search-token")
        assert main(["search", "--clip-id", ids[0], "-k", "3", "--url", url]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"version {version} (exact, {CLIPS} clips indexed)")
        assert len(out) == 4 and all(line.split()[2] in ids for line in out[1:])
        assert main(["search", "--clip-id", "e" * 64, "--url", url]) == 1
        assert "not_indexed" in capsys.readouterr().err
    finally:
        terminate(proc, timeout=30)
