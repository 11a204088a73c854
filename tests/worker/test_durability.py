"""What an ack promises, on a real Redis with the real tiny learner: acked clips are in a
durable checkpoint's ledger once each; a crash between the checkpoint and its acks retrains
nothing; a full disk stops the acks, not the service; one learner per group."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch

from contract import wire
from tests.queueing import enqueue
from worker import telemetry
from worker.checkpoint import latest_checkpoint, ledger_chain, load_checkpoint
from worker.core.synthetic import StreamConfig, make_clip, segment_specs
from worker.lease import LeaseTaken
from worker.runner import Worker


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    cfg = StreamConfig(num_segments=1)
    return [make_clip(s, cfg) for s in segment_specs(cfg, 0, 8, seed=5)]


def started(settings, client) -> Worker:
    w = Worker(settings, client)
    w.start()
    return w


def chain_clips(checkpoint_dir: str) -> list[str]:
    head = load_checkpoint(latest_checkpoint(checkpoint_dir))["ledger"]["hash"]
    return [c for seg in ledger_chain(checkpoint_dir, head) for c in seg.clip_ids]


def test_crash_between_checkpoint_and_acks_retrains_nothing(worker_settings, client, clips, prefix):
    settings = worker_settings(decode_processes=1)
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips[:4]]
    w = started(settings, client)
    w.iterate()
    w.checkpoints._start(*w._snapshot())  # the checkpoint becomes durable ...
    assert w.checkpoints.writer.finished(wait=True).error is None
    w.pool.shutdown()  # ... and the worker dies before it acks
    assert w.queue.depths()[1] == 4

    again = started(settings, client)
    saved, restored = w.learner.memory.state_dict(), again.learner.memory.state_dict()
    assert saved["seen"] == restored["seen"] == 4  # the memory came back from its segment
    assert all(torch.equal(saved["fields"][k], restored["fields"][k]) for k in saved["fields"])
    report = again.iterate()
    assert (report.duplicates, report.learned, again.counters.updates) == (4, 0, 1)
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in ids)
    assert again.queue.depths() == (0, 0, 0)
    again.pool.shutdown()
    assert sorted(chain_clips(settings.checkpoint_dir)) == sorted(ids)  # each clip once


def test_every_acked_clip_is_in_the_ledger_chain_once(worker_settings, client, clips, prefix):
    settings = worker_settings(decode_processes=1)
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips[:8]]
    w = started(settings, client)
    w.iterate()
    assert w.settle()
    w.iterate()  # published, not checkpointed: lost with the crash, relearned after it
    w.pool.shutdown()
    again = started(settings, client)
    again.iterate()
    assert again.settle()
    again.pool.shutdown()
    learned = [c for c in ids if client.hget(keys.clip(c), "state") == b"learned"]
    chain = chain_clips(settings.checkpoint_dir)
    assert sorted(learned) == sorted(ids) == sorted(chain)  # all acked, each in it once
    assert again.version == "2.2"


def test_a_second_learner_refuses_to_start(worker_settings, client, prefix):
    first = started(worker_settings(consumer="first"), client)
    second = Worker(worker_settings(consumer="second"), client)
    with pytest.raises(LeaseTaken, match="'first' \\(pid \\d+ on .*\\) is already learning"):
        second.start()
    first.pool.shutdown()
    second.pool.shutdown()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: far too small for a checkpoint (real ENOSPC); grown on demand."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)):
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk test is skipped")

    def grow():
        assert not _run("mount", "-o", "remount,size=256m", str(mount))

    yield mount, grow
    _run("umount", "-l", str(mount))


def _run(*argv: str) -> int:
    return subprocess.run(argv, capture_output=True).returncode


def test_a_full_disk_stops_acks_keeps_serving_and_resumes(
    worker_settings, client, clips, prefix, small_disk
):
    mount, grow = small_disk
    settings = worker_settings(decode_processes=1, checkpoint_dir=str(mount / "ck"))
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips[:4]]
    w = started(settings, client)
    report = w.iterate()
    assert report.learned == 4
    assert not w.settle()  # the write failed: nothing acked
    assert "bytes free on" in w.checkpoints.error  # the cause, stated
    assert telemetry.CHECKPOINT_FAILING._value.get() == 1
    w.heartbeat(force=True)
    assert client.hget(keys.model, "checkpoint_error")  # /readyz and operators see why
    assert all(client.hget(keys.clip(c), "state") == b"embedded" for c in ids)  # served
    assert w.queue.depths()[1] == 4 and not list(Path(mount / "ck").glob("ckpt-*.pt"))
    grow()
    assert w.settle()  # writable again: the next checkpoint holds and acks them
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in ids)
    assert telemetry.CHECKPOINT_FAILING._value.get() == 0
    w.pool.shutdown()
    assert sorted(chain_clips(settings.checkpoint_dir)) == sorted(ids)


def test_version_names_are_never_reused_across_crashes(worker_settings, client, clips, prefix):
    settings = worker_settings(decode_processes=1, embed_with="updated")
    keys = wire.Keys(prefix)
    seen: dict[str, str] = {}  # version -> the weights' fingerprint
    for round_ in range(3):  # each process: learn a batch, crash before any checkpoint
        for c in clips[round_ * 2 : round_ * 2 + 2]:
            enqueue(client, keys, c, task=uuid.uuid4().hex[:8])
        w = started(settings, client)
        w.iterate()
        fingerprint = str(sum(float(p.detach().sum()) for p in w.learner.model.parameters()))
        assert seen.setdefault(w.version, fingerprint) == fingerprint
        w.pool.shutdown()
    assert sorted(seen) == ["1.1", "2.1", "3.1"]  # the same N, three distinct names


# ---- Redis faults on a private redis-server ---------------------------------------------------
@pytest.fixture
def private_redis(tmp_path):
    from flava.procs import RedisProcess

    server = RedisProcess(
        tmp_path / "redis", extra_args=("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    )
    server.start()
    yield server
    server.stop()


def _fill_until_oom(client: redis.Redis) -> None:
    for i in range(2000):
        try:
            client.set(f"filler:{i}", b"x" * 65536)
        except redis.exceptions.OutOfMemoryError:
            return
    raise AssertionError("Redis never reached its maxmemory")


def test_an_out_of_memory_redis_is_waited_out_not_a_training_failure(
    worker_settings, clips, private_redis
):
    client = redis.Redis.from_url(private_redis.url)
    settings = worker_settings(redis_url=private_redis.url, decode_processes=1)
    keys = wire.Keys(settings.key_prefix)
    ids = [enqueue(client, keys, c) for c in clips[:4]]
    w = started(settings, client)
    _fill_until_oom(client)
    errors_before = telemetry.REDIS_ERRORS._value.get()
    thread = threading.Thread(target=w.iterate)
    thread.start()
    time.sleep(2.0)  # the worker backs off while every write is refused
    assert thread.is_alive() and telemetry.REDIS_ERRORS._value.get() > errors_before
    client.config_set("maxmemory", "512mb")  # the operator makes room
    thread.join(60)
    assert not thread.is_alive()
    assert w.settle()
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in ids)
    w.pool.shutdown()
    client.close()


def test_a_redis_that_lost_its_data_is_a_queue_reset_not_a_crash(
    worker_settings, clips, private_redis
):
    client = redis.Redis.from_url(private_redis.url)
    settings = worker_settings(redis_url=private_redis.url, decode_processes=1)
    keys = wire.Keys(settings.key_prefix)
    for c in clips[:4]:
        enqueue(client, keys, c)
    w = started(settings, client)
    w.iterate()  # 4 clips published, held for the checkpoint
    private_redis.stop()
    for f in (private_redis.workdir).rglob("*"):  # the AOF and any snapshot: data lost
        if f.is_file():
            f.unlink()
    private_redis.start()
    resets = telemetry.QUEUE_RESETS._value.get()
    fresh = [enqueue(client, keys, c) for c in clips[4:8]]
    w._retry(w.iterate)  # NOGROUP -> the group is recreated, then the new clips are learned
    while w.iterate() is not None:
        pass
    assert telemetry.QUEUE_RESETS._value.get() > resets
    assert w.settle()
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in fresh)
    assert w.counters.updates == 2  # the lost clips stay learned in the weights
    w.pool.shutdown()
    client.close()


def test_a_format_1_checkpoint_is_restored_and_continued(worker_settings, client, clips, prefix):
    """Written before generations, the ledger and memory segments: memory held whole."""
    from worker.checkpoint import list_checkpoints, save_checkpoint

    settings = worker_settings(decode_processes=1)
    keys = wire.Keys(prefix)
    for c in clips[:4]:
        enqueue(client, keys, c)
    w = started(settings, client)
    w.iterate()
    w.pool.shutdown()
    old = {  # what the worker wrote as format 1
        "learner": w.learner.state_dict(),
        "counters": {"version": 1, "step": 1, "clips_learned": 4},
        "method": settings.method,
        "preset": settings.preset,
    }
    save_checkpoint(settings.checkpoint_dir, "ckpt-0000000001.pt", old)
    again = started(settings, client)
    assert (again.counters.updates, again.version) == (1, "2.1")  # generations start above
    assert again.learner.memory.state_dict()["seen"] == 4
    again.iterate()  # the 4 clips were never acked: relearned
    assert again.settle()
    again.pool.shutdown()
    newest = list_checkpoints(settings.checkpoint_dir)[-1]
    listed = load_checkpoint(newest)["learner"]["extra"]["memory"]["segments"]
    assert len(listed) == 1  # the first segment after a whole-memory checkpoint is full
    assert len(torch.load(Path(settings.checkpoint_dir) / listed[0])["slots"]) == 8


def test_a_worker_started_on_a_full_disk_waits_for_room(worker_settings, client, small_disk):
    mount, grow = small_disk
    settings = worker_settings(decode_processes=1, checkpoint_dir=str(mount / "ck"))
    (mount / "ck").mkdir()
    with open(mount / "filler", "wb") as f:  # no byte left for the generation file
        with contextlib.suppress(OSError):
            f.write(b"\0" * (1 << 20))
    w = Worker(settings, client)
    thread = threading.Thread(target=w.start)
    thread.start()
    time.sleep(2.0)
    assert thread.is_alive() and w.counters.generation == 0  # waiting, not exited
    grow()
    thread.join(60)
    assert not thread.is_alive() and w.counters.generation == 1
    w.pool.shutdown()
