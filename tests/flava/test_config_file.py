"""Real processes started with a config file (FLAVA_CONFIG) and no other FLAVA_* variable:
``flava config show``, ``flava serve`` and ``flava worker`` take the file's values, a variable
overrides one, secrets never reach stdout or the log, and the log is JSON lines (not a TTY)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from contract import wire
from flava.procs import free_port, spawn, terminate, wait_until_ready

TOKEN = "cfg-token-5a4b3c2d1e"
PASSWORD = "cfg-pass-0f9e8d"


def clean_env(config: Path, **extra: str) -> dict[str, str]:
    """This environment without any FLAVA_* variable, then FLAVA_CONFIG and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAVA_")}
    return {**env, "FLAVA_CONFIG": str(config), **extra}


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def json_events(log: Path) -> list[dict]:
    """Every line of a process's output, each a JSON event (fails on a line that is not)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_config_show_prints_the_effective_settings_with_secrets_masked(tmp_path):
    config = write_config(
        tmp_path / "flava.toml",
        f'redis_url = "redis://:{PASSWORD}@redis:6379/0"\nmax_backlg = 5\n'
        f'[api]\napi_token = "{TOKEN}"\nmax_backlog = 42\n[worker]\nmethod = "er"\n',
    )
    env = clean_env(config, FLAVA_MAX_BACKLOG="7")
    run = [sys.executable, "-m", "flava", "config", "show"]
    shown = subprocess.run([*run, "--json"], env=env, capture_output=True, text=True, check=True)
    report = json.loads(shown.stdout)
    assert report["config_file"] == str(config) and report["unknown_keys"] == ["max_backlg"]
    assert report["api"]["max_backlog"] == 7  # the variable over the file's [api]
    assert report["worker"]["method"] == "er" and report["api"]["api_token"] == "***"
    assert report["worker"]["redis_url"] == "redis://:***@redis:6379/0"
    text = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout
    assert "[api]\n" in text and "max_backlog = 7\n" in text and 'method = "er"\n' in text
    for out in (shown.stdout, shown.stderr, text):
        assert TOKEN not in out and PASSWORD not in out


def api_config(tmp_path: Path, redis_url: str, prefix: str) -> Path:
    return write_config(
        tmp_path / "api.toml",
        f'redis_url = "{redis_url}"\nkey_prefix = "{prefix}"\nblob_dir = "{tmp_path / "blobs"}"\n'
        f'[api]\napi_token = "{TOKEN}"\nmax_backlog = 42\n',
    )


def serve(env: dict[str, str], log: Path):
    port = free_port()
    proc = spawn(["serve", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{url}/healthz", 120, [proc], log)
    return proc, url


def backlog_limit(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^flava_backlog_limit_clips (\S+)$", metrics, re.M)[1])


def test_the_api_takes_its_settings_from_the_file_and_logs_json(tmp_path, redis_url, prefix):
    config, log = api_config(tmp_path, redis_url, prefix), tmp_path / "api.log"
    proc, url = serve(clean_env(config), log)
    try:
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401  # the file's token
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/models", headers=auth, timeout=10).status_code == 200
        assert backlog_limit(url) == 42
        assert httpx.get(f"{url}/healthz?leak={TOKEN}", timeout=10).status_code == 200
    finally:
        terminate(proc, timeout=30)
    events = json_events(log)  # uvicorn's own lines and its access log included
    assert any(e["logger"] == "uvicorn.access" and "/healthz?leak=***" in e["msg"] for e in events)
    assert any(e["logger"] == "uvicorn.error" and "startup" in e["msg"] for e in events)
    assert TOKEN not in log.read_text()


def test_an_environment_variable_overrides_the_file_in_the_api(tmp_path, redis_url, prefix):
    config, log = api_config(tmp_path, redis_url, prefix), tmp_path / "api.log"
    proc, url = serve(clean_env(config, FLAVA_MAX_BACKLOG="9", FLAVA_LOG_FORMAT="text"), log)
    try:
        assert backlog_limit(url) == 9
    finally:
        terminate(proc, timeout=30)
    first = log.read_text().splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\d .* INFO uvicorn.error: ", first), first  # text forced


def test_the_worker_takes_its_settings_from_the_file(tmp_path, redis_url, prefix, client):
    """The file says preset base and method er; FLAVA_PRESET=tiny overrides the preset."""
    config = write_config(
        tmp_path / "worker.toml",
        f'redis_url = "{redis_url}"\nkey_prefix = "{prefix}"\npreset = "base"\n'
        f'[worker]\nmethod = "er"\nconsumer = "cfg-worker"\nblock_ms = 50\n'
        f'checkpoint_dir = "{tmp_path / "ckpt"}"\nmodels_dir = "{tmp_path / "models"}"\n'
        f'inputs_dir = "{tmp_path / "inputs"}"\nblob_dir = "{tmp_path / "blobs"}"\n',
    )
    log = tmp_path / "worker.log"
    proc = spawn(["worker"], clean_env(config, FLAVA_PRESET="tiny"), log)
    keys = wire.Keys(prefix)
    try:
        model = wait_for_heartbeat(client, keys, proc, log)
    finally:
        assert terminate(proc, timeout=60) == 0
    assert (model[b"method"], model[b"preset"]) == (b"er", b"tiny")
    assert client.zscore(keys.workers, "cfg-worker") is not None  # consumer from [worker]
    events = json_events(log)
    assert events and all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
    assert any(e["logger"].startswith("worker") for e in events)


def wait_for_heartbeat(client, keys: wire.Keys, proc, log: Path) -> dict[bytes, bytes]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        model = client.hgetall(keys.model)
        if model.get(b"method"):
            return model
        if proc.poll() is not None:
            pytest.fail(f"worker exited {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    pytest.fail(f"no heartbeat in 180 s: {log.read_text()[-2000:]}")
