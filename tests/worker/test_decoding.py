"""The worker's decode processes: same clips as in-process decoding, reasons, crash recovery."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.worker.core.media_fixtures import ClipSpec, encode_clip
from worker.core.media import MediaConfig, decode_clip
from worker.decoding import MISSING_BLOB, DecodePool, PendingDecode, decode_blob

CFG = MediaConfig(audio_frames=128, num_frames=2, frame_size=32)


@pytest.fixture(scope="module")
def clip_bytes() -> bytes:
    return encode_clip(ClipSpec(seconds=2.0))


@pytest.fixture
def pool():
    p = DecodePool(1, CFG)
    yield p
    p.shutdown()


def test_decode_blob_is_decode_clip_as_arrays(clip_bytes):
    decoded = decode_blob(clip_bytes, CFG)
    expected = decode_clip(clip_bytes, CFG)
    clip = decoded.clip()
    assert torch.equal(clip.fbank, expected.fbank) and torch.equal(clip.frames, expected.frames)
    assert clip.duration_s == expected.duration_s and decoded.seconds > 0


def test_missing_and_broken_bytes_become_reasons():
    assert decode_blob(None, CFG) == MISSING_BLOB
    reason = decode_blob(b"\x00\x00\x00\x18ftypmp42 not a video", CFG)
    assert isinstance(reason, str) and reason.startswith("UndecodableMedia")


def test_pool_decodes_in_a_one_thread_process(pool, clip_bytes):
    result = pool.result(pool.submit(clip_bytes))
    assert torch.equal(result.clip().frames, decode_clip(clip_bytes, CFG).frames)
    child = pool._executor.submit(os.getpid).result()  # a private door, for the test only
    assert child != os.getpid()
    assert pool._executor.submit(torch.get_num_threads).result() == 1


def test_a_dead_decode_process_is_replaced_and_its_clip_retried(pool, clip_bytes):
    pool.result(pool.submit(clip_bytes))
    killer = pool._executor.submit(os._exit, 3)  # what FFmpeg crashing on a clip looks like
    result = pool.result(PendingDecode(clip_bytes, killer, pool.generation, time.monotonic()))
    assert pool.generation == 1
    assert torch.equal(result.clip().fbank, decode_clip(clip_bytes, CFG).fbank)
    assert pool.result(pool.submit(None)) == MISSING_BLOB  # the new pool keeps working


def test_a_decode_past_its_deadline_is_retried_once_alone_and_the_pool_recovers(clip_bytes):
    """A first decode past its deadline (a starved or stuck process) is killed and the clip
    decoded once more, alone, with a fresh deadline: a healthy clip comes out."""
    pool = DecodePool(1, CFG, timeout_s=1.0)
    try:
        stuck = pool._executor.submit(time.sleep, 30)  # what a starved decode looks like
        started = time.monotonic()
        result = pool.result(PendingDecode(clip_bytes, stuck, pool.generation, started))
        assert torch.equal(result.clip().fbank, decode_clip(clip_bytes, CFG).fbank)
        assert pool.generation == 1 and time.monotonic() - started < 10
        assert torch.equal(
            pool.result(pool.submit(clip_bytes)).clip().fbank, decode_clip(clip_bytes, CFG).fbank
        )
    finally:
        pool.shutdown()


def test_decode_processes_run_at_a_lower_priority():
    pool = DecodePool(1, CFG, nice=5)
    try:
        child = pool._executor.submit(os.nice, 0).result()  # os.nice(0) reads the niceness
        assert child == os.nice(0) + 5
    finally:
        pool.shutdown()


def sleepy_decode(blob: bytes | None, cfg: MediaConfig, start_s: float | None = None):
    """decode_blob, except that bytes starting with b"slow" hang (as a hostile clip can)."""
    if blob is not None and blob.startswith(b"slow"):
        time.sleep(60)
    return decode_blob(blob, cfg, start_s)


def test_two_slow_clips_in_one_batch_each_get_a_deadline_and_the_rest_decodes(clip_bytes):
    pool = DecodePool(2, CFG, timeout_s=1.0, decode=sleepy_decode)
    try:
        batch = [pool.submit(b"slow-1"), pool.submit(b"slow-2"), pool.submit(clip_bytes)]
        started = time.monotonic()
        results = [pool.result(pending) for pending in batch]  # no CancelledError escapes
        assert results[:2] == ["decoding took longer than 1 s, also retried alone"] * 2
        # each slow clip hung once in the batch and once more alone (slow-2 was running when
        # slow-1's restart killed it); the queued clip was cancelled and retried
        assert torch.equal(results[2].clip().fbank, decode_clip(clip_bytes, CFG).fbank)
        assert pool.generation == 3  # slow-1 timed out twice, slow-2 once more alone
        assert time.monotonic() - started < 60
    finally:
        pool.shutdown()


def test_a_clip_retried_after_a_crash_still_has_a_deadline(clip_bytes):
    pool = DecodePool(1, CFG, timeout_s=1.0, decode=sleepy_decode)
    try:
        crash = pool._executor.submit(os._exit, 3)  # breaks the pool under the slow clip
        slow = PendingDecode(b"slow", crash, pool.generation, time.monotonic())
        started = time.monotonic()
        reason = pool.result(slow)  # the retry after the crash times out: refused, not forever
        assert reason == "decoding took longer than 1 s, also retried alone"
        assert time.monotonic() - started < 60
    finally:
        pool.shutdown()


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_decode_processes_die_with_a_sigkilled_worker():
    owner = subprocess.Popen(
        [sys.executable, "-m", "tests.worker.decode_owner"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout.readline().strip() == "ready"
        left_behind = descendants(owner.pid)
        assert len(left_behind) >= 2  # the decode processes (and the resource tracker)
    finally:
        owner.kill()  # SIGKILL: no cleanup code of the owner runs
        owner.wait()
    _, alive = psutil.wait_procs(left_behind, timeout=10)
    for process in alive:
        process.kill()  # so a failure does not leave them running either
    assert [p.cmdline() for p in alive] == []
