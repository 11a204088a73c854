"""A rank group of 2 on a real Redis: `flava worker --nproc 2` (torchrun, gloo, tiny, one
torch thread per rank). A SIGKILLed rank brings the group back from the last checkpoint
with nothing lost; SIGTERM drains every rank; the ranks take the same steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch

from contract import wire
from tests.queueing import enqueue, stream_clips
from worker.checkpoint import latest_checkpoint, ledger_chain, load_checkpoint, version_of
from worker.lease import LeaseTaken
from worker.ranks import RankGroup, Vote
from worker.runner import Worker


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    return stream_clips(24, seed=11)


def group_env(redis_url: str, prefix: str, workdir: Path, **extra: str) -> dict[str, str]:
    settings = {
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_KEY_PREFIX": prefix,
        "FLAVA_CONSUMER": "host",
        "FLAVA_METHOD": "er",
        "FLAVA_INIT_WEIGHTS": "none",
        "FLAVA_BATCH_SIZE": "2",
        "FLAVA_BLOCK_MS": "100",
        "FLAVA_DECODE_PROCESSES": "1",
        "FLAVA_CHECKPOINT_EVERY": "2",
        "FLAVA_HEARTBEAT_S": "0.5",
        "FLAVA_MONITOR_EVERY": "0",
        "FLAVA_PUBLISH_EVERY": "0",
        "FLAVA_INPUTS_DIR": "",
        "FLAVA_CHECKPOINT_DIR": str(workdir / "ckpt"),
        "FLAVA_BLOB_DIR": str(workdir / "blobs"),
        "FLAVA_MODELS_DIR": str(workdir / "models"),
        "OMP_NUM_THREADS": "1",
    }
    return {**os.environ, **settings, **extra}


def start_group(env: dict[str, str], log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "flava", "worker", "--nproc", "2", "--max-restarts", "2"]
    return subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of rank ``rank``: a child of torchrun (the launcher execs into it)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def states(client: redis.Redis, keys: wire.Keys, ids: list[str]) -> Counter:
    return Counter((client.hget(keys.clip(c), "state") or b"?").decode() for c in ids)


def wait_for(check: Callable[[], bool], timeout_s: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def chain(directory: Path) -> list[str]:
    """The clips the newest checkpoint's ledger chain holds, in order."""
    head = load_checkpoint(latest_checkpoint(directory))["ledger"]["hash"]
    return [c for seg in ledger_chain(directory, head) for c in seg.clip_ids]


def probes_kept(client: redis.Redis, keys: wire.Keys) -> int:
    summary = json.loads(client.get(keys.monitor) or "{}")
    return summary.get("windows", {}).get("held-out", {}).get("probes", 0)


def group_learned(client: redis.Redis, keys: wire.Keys) -> int:
    return int(client.hget(keys.model, "clips_learned") or 0)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=90)


def test_a_killed_rank_restarts_the_group_and_nothing_is_lost(
    redis_url, client, prefix, tmp_path, clips
):
    keys = wire.Keys(prefix)
    probes = [enqueue(client, keys, c, "probe", "held-out") for c in stream_clips(6, seed=12)]
    ids = [enqueue(client, keys, c) for c in clips]
    log = tmp_path / "group.log"
    proc = start_group(group_env(redis_url, prefix, tmp_path), log)
    try:
        wait_for(lambda: states(client, keys, ids)["learned"] >= 4, 180, proc, log)
        before = states(client, keys, ids)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: states(client, keys, ids)["learned"] == len(ids), 300, proc, log)
        # rank 0 reports the group's count: both ranks' clips, the re-learned ones once
        wait_for(lambda: group_learned(client, keys) == len(ids), 60, proc, log)
        # rank 0's monitor keeps every probe, whichever rank read it
        wait_for(lambda: probes_kept(client, keys) == len(probes), 60, proc, log)
    finally:
        code = stop(proc)
    text = log.read_text()
    assert before["learned"] < len(ids)  # killed mid-run
    assert "restart" in text.lower(), text[-3000:]
    version = wire.ModelVersion.parse(client.hget(keys.model, "version").decode())
    assert version.generation >= 2  # the group came back as a new generation
    ckpt = tmp_path / "ckpt"
    learned = chain(ckpt) + chain(ckpt / "rank-1")
    assert sorted(learned) == sorted(ids)  # every clip in one rank's chain, once
    assert client.xpending(keys.stream, wire.GROUP)["pending"] == 0
    assert states(client, keys, probes)["probed"] == len(probes)
    assert code == 0 or "got signal: 15" in text, text[-3000:]


def test_sigterm_drains_every_rank_at_one_version(
    redis_url, client, prefix, tmp_path, clips, worker_settings
):
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips[:16]]
    log = tmp_path / "group.log"
    proc = start_group(group_env(redis_url, prefix, tmp_path, FLAVA_CHECKPOINT_EVERY="50"), log)
    try:
        wait_for(lambda: states(client, keys, ids)["embedded"] >= 4, 180, proc, log)
        with pytest.raises(LeaseTaken):  # rank 0's lease covers the group
            other = worker_settings(
                consumer="other", checkpoint_dir=str(tmp_path / "other"), decode_processes=1
            )
            Worker(other, client).start()
    finally:
        stop(proc)
    seen = states(client, keys, ids)
    assert client.xpending(keys.stream, wire.GROUP)["pending"] == 0  # every rank acked
    assert seen["embedded"] == 0 and seen["learned"] >= 4
    assert seen["learned"] + seen["queued"] == len(ids), seen  # the rest never read
    ckpt = tmp_path / "ckpt"
    zero, one = latest_checkpoint(ckpt), latest_checkpoint(ckpt / "rank-1")
    assert version_of(zero) == version_of(one)  # the same steps on both ranks
    mine, yours = load_checkpoint(zero)["learner"], load_checkpoint(one)["learner"]
    assert "model" in mine and "optimizer" in mine
    assert "model" not in yours and "optimizer" not in yours  # rank 0's are the group's
    assert not torch.equal(mine["generator"], yours["generator"])  # each rank's own draws
    assert mine["extra"]["memory"]["segments"] and yours["extra"]["memory"]["segments"]
    assert sorted(chain(ckpt) + chain(ckpt / "rank-1")) == sorted(
        c for c in ids if client.hget(keys.clip(c), "state") == b"learned"
    )


def test_a_plain_workers_checkpoint_continues_as_a_group(
    redis_url, client, prefix, tmp_path, clips, worker_settings
):
    """Growing from 1 process to 2 ranks: rank 0 resumes the plain worker's checkpoint, rank
    1 has none and takes rank 0's weights; the lineage goes on, nothing is lost."""
    keys = wire.Keys(prefix)
    first = [enqueue(client, keys, c) for c in clips[:8]]
    plain = worker_settings(
        consumer="host",
        method="er",
        init_weights="none",
        batch_size=2,
        max_steps=4,
        decode_processes=1,
        inputs_dir="",
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    Worker(plain, client).run(threading.Event())  # 4 steps, then a checkpoint and the acks
    assert states(client, keys, first)["learned"] == len(first)
    second = [enqueue(client, keys, c) for c in clips[8:16]]
    log = tmp_path / "group.log"
    proc = start_group(group_env(redis_url, prefix, tmp_path), log)
    try:
        wait_for(lambda: states(client, keys, second)["learned"] == len(second), 180, proc, log)
    finally:
        stop(proc)
    version = wire.ModelVersion.parse(client.hget(keys.model, "version").decode())
    assert version.generation == 2 and version.updates > 4  # the plain worker's lineage on
    ckpt = tmp_path / "ckpt"
    assert sorted(chain(ckpt) + chain(ckpt / "rank-1")) == sorted(first + second)


def test_the_group_answer_is_any_flag_the_oldest_durable_and_summed_counts():
    rows = [
        Vote(step=True, durable=20, learned=5, unacked=2).as_row(),
        Vote(stop=True, durable=10, learned=7).as_row(),
        Vote(checkpoint=True, paused=True, probes=True, durable=30, unacked=1).as_row(),
    ]
    group = Vote.of_group(rows)
    flags = (group.step, group.stop, group.checkpoint, group.paused, group.probes)
    assert flags == (True,) * 5
    assert (group.durable, group.learned, group.unacked) == (10, 12, 3)
    assert Vote.of_group([Vote().as_row(), Vote(durable=4).as_row()]) == Vote(durable=-1)


def test_worker_main_is_flava_worker_for_torchrun():
    """`torchrun ... -m worker.main` runs what `flava worker` runs (here its --help)."""
    done = subprocess.run(
        [sys.executable, "-m", "worker.main", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--nproc" in done.stdout


def test_rank_settings_name_the_consumer_host_and_rank(worker_settings, tmp_path):
    base = worker_settings(consumer="host", seed=4)
    zero = RankGroup(0, 2, 0).settings_for(base)
    one = RankGroup(1, 2, 1).settings_for(base)
    assert (zero.consumer, one.consumer) == ("host-0", "host-1")
    assert zero.checkpoint_dir == base.checkpoint_dir
    assert one.checkpoint_dir == str(Path(base.checkpoint_dir) / "rank-1")
    assert zero.seed != one.seed
    assert (one.publish_every, one.monitor_every, one.metrics_port) == (0, 0, 0)
    assert Vote().durable == -1
