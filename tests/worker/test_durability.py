"""What an ack promises, on a real Redis with the real tiny learner: acked clips are in a
durable checkpoint's ledger once each; a crash between the checkpoint and its acks retrains
nothing; a full disk stops the acks, not the service; one learner per group."""

from __future__ import annotations

import subprocess
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
from worker.queue import LeaseTaken
from worker.runner import Worker


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    cfg = StreamConfig(num_segments=1)
    return [make_clip(s, cfg) for s in segment_specs(cfg, 0, 8, seed=5)]


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


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
    with pytest.raises(LeaseTaken, match="'first' is already learning"):
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
