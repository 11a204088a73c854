"""Real processes, default checkpoint policy, SIGKILLs of the worker and of Redis (one losing
its data): nothing accepted is lost, every learned clip is in the final model's ledger, no
version names two weight states, no process is left behind."""

from __future__ import annotations

import json
import os
import time

import redis

from bench.chaos import PREFIX, ChaosConfig, run_chaos, write_results
from contract import wire
from flava.procs import RedisProcess, spawn, terminate


def test_short_chaos_under_defaults_loses_nothing(tmp_path):
    cfg = ChaosConfig(clips=60, bad_every=30, kills=2, redis_sigkills=1, redis_data_loss=1)
    cfg.disk_full_s = 0  # the full run covers the full disk (it needs root for a tmpfs)
    report = run_chaos(cfg, tmp_path)
    summary = {k: v for k, v in report.items() if k != "config"}
    assert report["kills"] == 2 and report["redis_sigkills"] == 2, summary
    assert report["redis_data_loss_restarts"] == 1 and report["appendfsync"] == "everysec"
    assert report["checkpoint_every"] == 50  # the default policy, not a test setting
    assert report["clips"] == 60 and report["accepted"] + report["rejected"] == 60
    assert report["lost"] == 0 and report["vanished_unreported"] == 0, summary
    assert report["learned"] + report["dead_lettered"] == report["accepted"], summary
    assert report["learned"] >= report["accepted"] - 2  # only the corrupted uploads may die
    assert report["updates_lost"] == 0 and "ledger_error" not in report, summary
    assert report["trained_twice"] == 0, summary
    assert report["versions_reused"] == 0 and report["generations_claimed"] == 3, summary
    assert report["ledger_versions_ordered"]
    assert report["orphan_processes"] == 0, summary
    assert report["recovery_s"]["n"] == 2 and report["learned_p99_s"] is not None
    write_results(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "chaos.json").read_text())["lost"] == 0


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
        "FLAVA_INPUTS_DIR": str(tmp_path / "inputs"),
        "FLAVA_MODELS_DIR": str(tmp_path / "models"),
        "FLAVA_CONSUMER": "w",
        "FLAVA_BATCH_SIZE": "4",
        "FLAVA_SHUTDOWN_GRACE_S": "60",
    }
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while _updates(client.hget(keys.model, "version")) < 1:
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


def _updates(version: bytes | None) -> int:
    """N of the published version "G.N" (0 before any)."""
    return wire.ModelVersion.parse(version.decode()).updates if version else 0
