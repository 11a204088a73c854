"""The worker's decode processes: same clips as in-process decoding, reasons, crash recovery."""

from __future__ import annotations

import os
import time

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


def test_a_decode_past_its_deadline_is_refused_and_the_pool_recovers(clip_bytes):
    pool = DecodePool(1, CFG, timeout_s=1.0)
    try:
        hung = pool._executor.submit(time.sleep, 30)  # what a hung FFmpeg looks like
        started = time.monotonic()
        reason = pool.result(PendingDecode(clip_bytes, hung, pool.generation, started))
        assert reason == "decoding took longer than 1 s"
        assert time.monotonic() - started < 10
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
