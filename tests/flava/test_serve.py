"""``flava serve --workers 2``: several API processes behind one port, on a real Redis."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from flava.procs import free_port, spawn, terminate


def test_serve_with_two_worker_processes_answers(tmp_path: Path, redis_url, prefix):
    port = free_port()
    env = {**os.environ, "FLAVA_REDIS_URL": redis_url, "FLAVA_KEY_PREFIX": prefix}
    args = ["--log-level", "warning", "serve", "--port", str(port), "--workers", "2"]
    proc = spawn(args, env, tmp_path / "api.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/embed", params={"clip_id": "0" * 64})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-2000:]
                time.sleep(0.2)
        assert answer.status_code == 404 and answer.json()["status"] == "unknown"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) >= 2  # the supervisor's worker processes (+ its resource tracker)
    finally:
        assert terminate(proc, timeout=30) == 0
