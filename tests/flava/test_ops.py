"""``flava status`` and ``flava dead`` against a real ``flava serve`` process, a real Redis and
a real Worker (started, one batch of junk dead-lettered)."""

from __future__ import annotations

import os

import pytest

from contract import wire
from flava.cli import main
from flava.procs import free_port, spawn, terminate, wait_until_ready
from tests.queueing import enqueue
from worker.runner import Worker

TOKEN = "ops-cli-token"


@pytest.fixture
def served(tmp_path, redis_url, prefix):
    port = free_port()
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_KEY_PREFIX": prefix,
        "FLAVA_API_TOKEN": TOKEN,
    }
    args = ["--log-level", "warning", "serve", "--port", str(port)]
    proc = spawn(args, env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/healthz", 180, [proc], tmp_path / "api.log")
        yield url
    finally:
        terminate(proc, timeout=30)


def test_status_and_dead_commands(served, worker_settings, client, prefix, capsys):
    keys = wire.Keys(prefix)
    auth = ["--url", served, "--token", TOKEN]
    assert main(["status", *auth]) == 1  # no worker has published: 404 no_model, said so
    assert "no_model" in capsys.readouterr().err
    worker = Worker(worker_settings(decode_processes=1), client)
    worker.start()
    junk = enqueue(client, keys, b"no video here")
    assert worker.iterate().dead == 1

    assert main(["status", *auth]) == 0
    out = capsys.readouterr().out
    assert "version     : 1.0 (generation 1, step 0" in out and "learning" in out
    assert main(["status", "pause", *auth]) == 0
    assert client.hget(keys.control, "paused") == b"1"
    assert "(asked: pause)" in capsys.readouterr().out  # the worker has not acted yet
    assert main(["status", "rollback", *auth]) == 2  # no --version
    assert main(["status", "rollback", "--version", "1.7", *auth]) == 1  # not durable
    assert "not_durable" in capsys.readouterr().err

    assert main(["dead", *auth]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 dead letters") and f"{junk} task=t retryable" in out
    assert main(["dead", "--retry", junk, *auth]) == 0
    assert client.hget(keys.clip(junk), "state") == b"queued"
    assert main(["dead", "--retry", junk, *auth]) == 1  # queued now: not dead
    assert "not_dead" in capsys.readouterr().err
    assert main(["dead", "--token", "wrong", "--url", served]) == 1
