"""Redis saying "not now" is a 503 + Retry-After, never a 500: each fault on a real redis-server
(full memory with noeviction, a read-only replica, a long script, a stopped process)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from contract import wire
from contract.faults import unavailable
from flava.procs import RedisProcess
from service.app import create_app
from service.settings import ApiSettings
from tests.worker.core.media_fixtures import ClipSpec, encode_clip

PREFIX = "faults"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_clip(ClipSpec(seconds=1.0))


def post(api, data: bytes):
    return api.post("/ingest", content=data, headers={"Content-Type": "video/mp4"})


def assert_503(response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert response.json()["detail"]["code"] == code
    assert "retry" in response.json()["detail"]["reason"]


def api_for(url: str) -> TestClient:
    return TestClient(create_app(ApiSettings(redis_url=url, key_prefix=PREFIX)))


@pytest.fixture
def server(tmp_path, request):
    """A private redis-server with the test's extra options (``request.param``)."""
    proc = RedisProcess(tmp_path / "redis", extra_args=request.param)
    proc.start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
    proc.stop()


def fill_until_oom(client: redis.Redis) -> None:
    for i in range(1000):
        try:
            client.set(f"filler:{i}", os.urandom(64 * 1024))
        except redis.exceptions.OutOfMemoryError:
            return
    raise AssertionError("Redis never reached its maxmemory")


@pytest.mark.parametrize(
    "server", [("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")], indirect=True
)
def test_out_of_memory_is_503_and_writes_nothing(server, clip):
    client = redis.Redis.from_url(server.url)
    fill_until_oom(client)
    with api_for(server.url) as api:
        assert_503(post(api, clip), "redis_out_of_memory")
        keys = wire.Keys(PREFIX)
        assert not client.exists(keys.stream, keys.backlog, keys.backlog_bytes, keys.epoch)
        client.config_set("maxmemory", 0)  # the queue drained / the operator raised the limit
        assert post(api, clip).status_code == 202
    client.close()


@pytest.mark.parametrize("server", [()], indirect=True)
def test_a_read_only_replica_refuses_writes_with_503_and_still_serves_reads(server, clip, tmp_path):
    with api_for(server.url) as primary_api:
        accepted = post(primary_api, clip).json()
    replica = RedisProcess(
        tmp_path / "replica", extra_args=("--replicaof", "127.0.0.1", str(server.port))
    )
    replica.start()
    try:
        wait_for_sync(redis.Redis.from_url(replica.url), wire.Keys(PREFIX).epoch)
        with api_for(replica.url) as api:  # the API's Redis is now a replica (failover)
            other = encode_clip(ClipSpec(seconds=1.0, tone_hz=900.0))
            assert_503(post(api, other), "redis_read_only")
            pending = api.get("/embed", params={"clip_id": accepted["clip_id"]})
            assert pending.status_code == 202 and pending.json()["status"] == "pending"
            unknown = api.get("/embed", params={"clip_id": "2" * 64})
            assert unknown.status_code == 404
            assert unknown.json()["queue_epoch"] == accepted["queue_epoch"]
    finally:
        replica.stop()


def wait_for_sync(client: redis.Redis, key: str, timeout: float = 10.0) -> None:
    """Until the replica has loaded its primary's data (it answers LOADING while it loads)."""
    deadline = time.monotonic() + timeout
    while not synced(client, key):
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.05)
    client.close()


def synced(client: redis.Redis, key: str) -> bool:
    try:
        link = client.info("replication").get("master_link_status")
        return link == "up" and bool(client.exists(key))
    except redis.exceptions.BusyLoadingError:
        return False


@pytest.mark.parametrize("server", [("--busy-reply-threshold", "100")], indirect=True)
def test_a_busy_redis_is_503(server, clip):
    # a script that runs until SCRIPT KILL (bounded, in case the kill never comes)
    spin = "local i = 0 while i < 2000000000 do i = i + 1 end return i"
    runner = threading.Thread(target=run_until_killed, args=(server.url, spin))
    runner.start()
    time.sleep(0.5)  # past the 100 ms threshold: everyone else now gets BUSY
    try:
        with api_for(server.url) as api:
            assert_503(post(api, clip), "redis_busy")
            assert_503(api.get("/embed", params={"clip_id": "3" * 64}), "redis_busy")
    finally:
        redis.Redis.from_url(server.url).script_kill()
        runner.join()
    with api_for(server.url) as api:
        assert post(api, clip).status_code == 202


def run_until_killed(url: str, script: str) -> None:
    with pytest.raises(redis.ResponseError, match="killed"):
        redis.Redis.from_url(url, socket_timeout=60).eval(script, 0)


@pytest.mark.parametrize("server", [()], indirect=True)
def test_a_redis_that_stops_answering_is_503(server, clip):
    client = aioredis.Redis.from_url(server.url, socket_timeout=0.5)
    settings = ApiSettings(redis_url=server.url, key_prefix=PREFIX)
    with TestClient(create_app(settings, client)) as api:
        assert post(api, clip).status_code == 202
        server.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            assert_503(api.get("/embed", params={"clip_id": "4" * 64}), "redis_timeout")
        finally:
            server.proc.send_signal(signal.SIGCONT)


def test_other_redis_errors_are_not_called_unavailable():
    assert unavailable(redis.ResponseError("WRONGTYPE Operation against a key")) is None
    assert unavailable(ValueError("not redis")) is None
    busy = "BUSY Redis is busy running a script"
    assert unavailable(redis.ResponseError(busy)).code == "redis_busy"
    in_pipeline = f"Command # 1 (HGETALL k) of pipeline caused error: ('{busy}',)"
    assert unavailable(redis.ResponseError(in_pipeline)).code == "redis_busy"
    assert unavailable(redis.ResponseError("BUSYGROUP Consumer Group name already exists")) is None
