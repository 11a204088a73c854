"""Secrets on the command line's side: no log line of a real process carries a password or
the API token, and the client commands take the token from FLAVA_API_TOKEN."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from contract.redact import redact, secrets_from_env
from flava.procs import free_port, spawn, terminate
from tests.worker.core.media_fixtures import ClipSpec, encode_clip

PASSWORD = "pw-never-logged-7f3a"
TOKEN = "tok-never-logged-91c2"


def test_the_worker_start_line_carries_no_password(tmp_path: Path):
    """A real worker with a password in FLAVA_REDIS_URL (nothing listens there: it logs its
    start, then retries the connection) and the token in its environment."""
    url = f"redis://flava:{PASSWORD}@127.0.0.1:{free_port()}/0"
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": url,
        "FLAVA_API_TOKEN": TOKEN,
        "FLAVA_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "FLAVA_MODELS_DIR": str(tmp_path / "models"),
        "FLAVA_INPUTS_DIR": str(tmp_path / "inputs"),
        "FLAVA_BLOB_DIR": str(tmp_path / "blobs"),
    }
    log = tmp_path / "worker.log"
    proc = spawn(["worker"], env, log)
    try:
        deadline = time.monotonic() + 120
        while "redis=" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        terminate(proc, timeout=30)
    text = log.read_text()
    start = next(line for line in text.splitlines() if "redis=" in line)
    assert "redis=redis://flava:***@127.0.0.1:" in start, start
    assert PASSWORD not in text and TOKEN not in text


def test_redaction_keeps_the_rest_of_a_line():
    secrets = secrets_from_env({"FLAVA_API_TOKEN": TOKEN, "FLAVA_KEY_PREFIX": "flava-prod"})
    assert secrets == [TOKEN]  # a key prefix is no secret
    line = f"GET /x token={TOKEN} via postgres://u:{PASSWORD}@db:5432/x and http://h:80/p"
    assert (
        redact(line, secrets) == "GET /x token=*** via postgres://u:***@db:5432/x and http://h:80/p"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_url):
    """`flava serve` with a token, on the shared Redis under its own prefix."""
    tmp = tmp_path_factory.mktemp("served")
    port = free_port()
    prefix = f"test-secrets-{port}"
    env = {**os.environ, "FLAVA_REDIS_URL": redis_url, "FLAVA_KEY_PREFIX": prefix,
           "FLAVA_API_TOKEN": TOKEN, "FLAVA_BLOB_DIR": str(tmp / "blobs")}  # fmt: skip
    proc = spawn(["serve", "--port", str(port)], env, tmp / "api.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/healthz")
            break
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    clip = tmp / "clip.mp4"
    clip.write_bytes(encode_clip(ClipSpec(seconds=1.0)))
    yield url, clip
    terminate(proc, timeout=30)
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def flava(args: list[str], token_env: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FLAVA_API_TOKEN"}
    if token_env is not None:
        env["FLAVA_API_TOKEN"] = token_env
    return subprocess.run(
        [sys.executable, "-m", "flava", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        (["push", "{clip}"], "no error"),  # 202
        (["models"], "no error"),  # 200, nothing published
        (["embed", "{clip}"], "503"),  # no embedder runs: past the token check
        (["search", "--clip-id", "0" * 64], "404"),  # no index: past the token check
    ],
)
def test_client_commands_take_the_token_from_the_environment(served, command, answer):
    url, clip = served
    args = [a.replace("{clip}", str(clip)) for a in command] + ["--url", url]
    without = flava(args, None)
    assert without.returncode == 1 and "401" in without.stderr, without.stderr
    given = flava(args, TOKEN)
    assert "401" not in given.stderr, given.stderr
    if answer == "no error":
        assert given.returncode == 0, given.stderr
    else:
        assert given.returncode == 1 and answer in given.stderr, given.stderr
    flag = flava([*args, "--token", TOKEN], "wrong-token-from-env")  # --token wins
    assert "401" not in flag.stderr and flag.returncode == given.returncode
