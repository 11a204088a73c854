"""End to end on real parts: the API (ASGI) and the worker (thread) on a real Redis,
real encoded MP4s in, embeddings out, and the model version advancing as it learns."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from fastapi.testclient import TestClient

from contract import wire
from flava.procs import wait_until_ready
from service.app import create_app
from service.settings import ApiSettings
from worker.core.synthetic import StreamConfig, drifting_stream
from worker.runner import Worker


@pytest.fixture
def stack(redis_url, prefix, worker_settings):
    api_settings = ApiSettings(redis_url=redis_url, key_prefix=prefix, api_token="t")
    settings = worker_settings(consumer="e2e", heartbeat_s=0.2)
    client = redis.Redis.from_url(redis_url)
    worker, stop = Worker(settings, client), threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    with TestClient(create_app(api_settings), headers={"Authorization": "Bearer t"}) as api:
        thread.start()
        yield api, worker
        stop.set()
        thread.join(timeout=60)
    client.close()


def wait_ready(api, ids: list[str], timeout: float = 120.0) -> dict[str, dict]:
    done, deadline = {}, time.monotonic() + timeout
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"only {len(done)}/{len(ids)} embedded"
        for cid in ids:
            r = api.get("/embed", params={"clip_id": cid})
            if r.status_code == 200:
                done[cid] = r.json()
        time.sleep(0.1)
    return done


def test_clips_in_embeddings_out_versions_advance(stack):
    api, worker = stack
    clips = list(drifting_stream(StreamConfig(num_segments=2), 6, seed=3))
    wait_until_ready("/readyz", 30, client=api, interval_s=0.1)
    first = [_post(api, data, spec.segment) for spec, data in clips[:6]]
    early = wait_ready(api, first)
    later = [_post(api, data, spec.segment) for spec, data in clips[6:]]
    late = wait_ready(api, later)
    early_v = max(wire.ModelVersion.parse(e["model_version"]) for e in early.values())
    late_v = min(wire.ModelVersion.parse(e["model_version"]) for e in late.values())
    assert early_v.generation == late_v.generation == 1  # one process: one generation
    assert early_v < late_v
    sample = next(iter(late.values()))
    assert sample["dim"] == worker.model_cfg.dim == len(sample["audio"]) == len(sample["video"])
    assert sample["method"] == worker.settings.method
    wait_learned(api, first + later)  # acked once a checkpoint holds them (the stream idles)
    repost = api.post("/ingest", content=clips[0][1], headers={"Content-Type": "video/mp4"})
    assert repost.json()["status"] == "duplicate" and repost.json()["state"] == "learned"


def wait_learned(api, ids: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for cid in ids:
        while api.get("/embed", params={"clip_id": cid}).json().get("state") != "learned":
            assert time.monotonic() < deadline, f"clip {cid[:12]} not learned"
            time.sleep(0.1)


def _post(api, data: bytes, segment: int) -> str:
    r = api.post(
        "/ingest",
        params={"task": f"seg-{segment}"},
        content=data,
        headers={"Content-Type": "video/mp4"},
    )
    assert r.status_code == 202, r.text
    return r.json()["clip_id"]
