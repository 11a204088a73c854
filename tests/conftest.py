"""Shared fixtures: a real Redis (the shared one, or a private server), unique key prefixes."""

from __future__ import annotations

import uuid

import pytest
import redis

from flava.procs import RedisProcess

SHARED_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def decode_pools_end_with_their_test(monkeypatch):
    """Shut down every decode pool a test started (a Worker's, say) when the test ends.

    Each decode process is a spawned Python with torch loaded (~0.5 GB): pools left to the
    end of the session would add up to more memory than the machine has."""
    from worker.decoding import DecodePool

    pools: list[DecodePool] = []
    original = DecodePool.__init__

    def tracked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        pools.append(self)

    monkeypatch.setattr(DecodePool, "__init__", tracked)
    yield
    for pool in pools:
        pool.shutdown()


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server, for tests that stop, restart or flood Redis."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis on 127.0.0.1:6379 (.ci/run starts one if none answers)."""
    try:
        redis.Redis.from_url(SHARED_URL, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pytest.fail("no Redis on 127.0.0.1:6379: start one (see .ci/run)")
    return SHARED_URL


@pytest.fixture
def client(redis_url):
    """A synchronous client of the shared Redis."""
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def prefix(redis_url):
    """A unique key prefix; its keys are deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def worker_settings(redis_url, prefix, tmp_path):
    """Worker settings for tests on the shared Redis: ``worker_settings(**overrides)``."""
    from worker.settings import WorkerSettings

    def make(**overrides) -> WorkerSettings:
        fields = dict(
            redis_url=redis_url,
            key_prefix=prefix,
            consumer="w1",
            batch_size=4,
            block_ms=50,
            checkpoint_dir=str(tmp_path / "ckpt"),
            models_dir=str(tmp_path / "models"),
            blob_dir=str(tmp_path / "blobs"),  # where the API of a test stores long uploads
            inputs_dir=str(tmp_path / "inputs"),
            checkpoint_every=1000,  # tests checkpoint when they choose (settle) or on idle:
            checkpoint_interval_s=3600.0,  # a slow shared machine must not add one mid-test
        )
        return WorkerSettings(**(fields | overrides))

    return make
