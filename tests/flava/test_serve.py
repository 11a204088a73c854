"""``flava serve --workers 2``: several API processes behind one port, on a real Redis."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from flava.procs import free_port, spawn, terminate, wait_until_ready
from tests.worker.core.media_fixtures import ClipSpec, encode_clip


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


def test_ingest_lines_carry_the_clip_id(tmp_path: Path, redis_url, prefix):
    """flava serve writing JSON lines (not a terminal): each /ingest answer is one event of
    service.app whose clip_id field is the clip's sha256, refused bodies included."""
    port, log = free_port(), tmp_path / "api.log"
    env = {**os.environ, "FLAVA_REDIS_URL": redis_url, "FLAVA_KEY_PREFIX": prefix}
    proc = spawn(["--log-format", "json", "serve", "--port", str(port)], env, log)
    clip, junk = encode_clip(ClipSpec(seconds=1.0, tone_hz=777.0)), b"not a clip " + prefix.encode()
    mp4 = {"Content-Type": "video/mp4"}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(f"{url}/healthz", 120, [proc], log)
        with httpx.Client(base_url=url, timeout=60) as http:
            answers = [
                http.post("/ingest", content=body, headers=mp4, params={"task": "t1"})
                for body in (clip, clip, junk)
            ]
    finally:
        terminate(proc, timeout=30)  # uvicorn re-raises the SIGTERM once it has shut down
    assert [a.status_code for a in answers] == [202, 200, 415]
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    ingest = [e for e in events if e["logger"] == "service.app"]
    cid, junk_id = hashlib.sha256(clip).hexdigest(), hashlib.sha256(junk).hexdigest()
    assert answers[0].json()["clip_id"] == cid
    assert [(e["clip_id"], e["outcome"]) for e in ingest] == [
        (cid, "queued"),
        (cid, "duplicate"),
        (junk_id, "undecodable"),
    ]
    assert (ingest[0]["task"], ingest[0]["purpose"], ingest[0]["size"]) == (
        "t1",
        "train",
        len(clip),
    )
    assert ingest[0]["msg"] == f"ingest {cid[:12]}: queued" and ingest[0]["level"] == "info"


# ---- /metrics with several API processes (prometheus_client multiprocess mode) ------------


def answering_pid(conn: http.client.HTTPConnection, server_port: int, pids: list[int]) -> int:
    """Which of ``pids`` holds the server end of ``conn`` (still open): /proc/net/tcp names
    the socket connected to our local port, /proc/PID/fd the process that has it."""
    client_port = conn.sock.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
        if (local, remote) == (server_port, client_port):
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no process of {pids} holds port {client_port}'s peer")


def request(port: int, pids: list[int], method: str, path: str, body: bytes | None = None):
    """One request on a fresh connection: (pid that answered, status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "video/mp4"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        return answering_pid(conn, port, pids), answer.status, data
    finally:
        conn.close()


def ingest_total(text: str) -> tuple[float, float]:
    """(flava_ingest_requests_total over every outcome, flava_ingest_seconds' count)."""
    requests = seconds = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "flava_ingest_requests_total":
                requests += sample.value
            elif sample.name == "flava_ingest_seconds_count":
                seconds += sample.value
    return requests, seconds


def test_metrics_add_up_every_api_process(tmp_path: Path, redis_url, prefix):
    """Ingests spread over two API processes; /metrics says all of them whichever answers."""
    clips = [encode_clip(ClipSpec(seconds=1.0, tone_hz=300.0 + 50 * i)) for i in range(4)]
    port, metrics_dir = free_port(), tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale")  # an earlier run's: emptied at start
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_KEY_PREFIX": prefix,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    args = ["--log-level", "warning", "serve", "--port", str(port), "--workers", "2"]
    log = tmp_path / "api.log"
    proc = spawn(args, env, log)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/healthz", 60, [proc], log)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        pids = [int(p) for p in children]
        sent, ingested_by, scraped_by = 0, set(), set()
        with ThreadPoolExecutor(8) as pool:
            # concurrent fresh connections until both processes have taken ingests
            while len(ingested_by) < 2:
                assert sent < 160, f"all {sent} ingests went to {ingested_by}"
                batch = [clips[(sent + i) % len(clips)] for i in range(8)]
                answers = pool.map(lambda c: request(port, pids, "POST", "/ingest", c), batch)
                for pid, status, body in answers:
                    assert status in (200, 202), body  # 200: a duplicate, counted too
                    ingested_by.add(pid)
                sent += len(batch)
            scrapes = 0
            while len(scraped_by) < 2:
                assert scrapes < 160, f"all {scrapes} scrapes went to {scraped_by}"
                answers = pool.map(lambda _: request(port, pids, "GET", "/metrics"), range(8))
                for pid, status, body in answers:
                    assert status == 200
                    assert ingest_total(body.decode()) == (sent, sent), pid
                    scraped_by.add(pid)
                scrapes += 8
        assert not (metrics_dir / "counter_1.db").exists()
    finally:
        assert terminate(proc, timeout=30) == 0
    # each process dropped its live gauges on the way out; counters stay, summed for ever
    assert not list(metrics_dir.glob("gauge_live*.db")), sorted(metrics_dir.iterdir())
    assert {int(f.stem.split("_")[-1]) for f in metrics_dir.glob("counter_*.db")} >= ingested_by
