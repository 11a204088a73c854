"""Real processes, SIGKILLs and a Redis restart while clips arrive: nothing accepted is lost."""

from __future__ import annotations

import json
import os
import time

import redis

from bench.chaos import PREFIX, ChaosConfig, run_chaos, write_results
from contract import wire
from flava.procs import RedisProcess, spawn, terminate


def test_kills_and_redis_restart_lose_nothing(tmp_path):
    cfg = ChaosConfig(clips=40, bad_every=15, kills=3, kill_every_s=5.0, redis_restart_at_kill=1)
    report = run_chaos(cfg, tmp_path)
    assert report.kills == 3 and report.redis_restarts == 1
    assert report.sent == 40 and report.accepted + report.rejected == 40
    assert report.lost == 0, report
    assert report.learned + report.dead_lettered == report.accepted
    assert report.learned >= report.accepted - 3  # only the corrupted uploads may die
    assert report.versions_monotonic and report.final_version > 0
    write_results(report, cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "chaos.json").read_text())["report"]["lost"] == 0


def test_sigterm_finishes_batch_checkpoints_and_exits_zero(tmp_path):
    from tests.queueing import enqueue
    from worker.core.synthetic import StreamConfig, drifting_stream

    server = RedisProcess(tmp_path / "redis")
    server.start()
    client = redis.Redis.from_url(server.url)
    keys = wire.Keys(PREFIX)
    ids = [
        enqueue(client, keys, data) for _, data in drifting_stream(StreamConfig(num_segments=1), 16)
    ]
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": server.url,
        "FLAVA_KEY_PREFIX": PREFIX,
        "FLAVA_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "FLAVA_CONSUMER": "w",
        "FLAVA_BATCH_SIZE": "4",
        "FLAVA_SHUTDOWN_GRACE_S": "60",
    }
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while not client.hget(keys.model, "version") or int(client.hget(keys.model, "version")) < 1:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.1)
        started = time.monotonic()
        status = terminate(worker, timeout=60)
        assert status == 0, (tmp_path / "worker.log").read_text()[-2000:]
        assert time.monotonic() - started < 60
    finally:
        terminate(worker)
    assert client.xpending(keys.stream, wire.GROUP)["pending"] == 0  # the batch in hand was acked
    assert list((tmp_path / "ckpt").glob("ckpt-*.pt"))
    states = [client.hget(keys.clip(c), "state") for c in ids]
    assert all(s in (b"learned", b"queued") for s in states) and b"learned" in states
    client.close()
    server.stop()
