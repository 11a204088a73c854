"""worker/inputs.py: kept inputs round trip, skipping by name, retention."""

from __future__ import annotations

import logging
import os
import time

import torch

from contract.index import input_path
from worker.core.media import Clip
from worker.inputs import InputStore


def _clip(seed: int) -> Clip:
    g = torch.Generator().manual_seed(seed)
    return Clip(torch.randn(16, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g), 3.0)


def test_kept_inputs_round_trip_in_float16_and_filter_by_task(tmp_path):
    store = InputStore(tmp_path)
    store.put("a" * 64, "seg-1", "tiny", _clip(0))
    store.put(f"{'b' * 64}:3", "seg-2", "tiny", _clip(1))  # a window of an upload
    kept = {k.clip_id: k for k in store.scan()}
    assert set(kept) == {"a" * 64, f"{'b' * 64}:3"}
    assert torch.allclose(kept["a" * 64].clip.fbank, _clip(0).fbank, atol=1e-2)
    assert [k.clip_id for k in store.scan(task="seg-2")] == [f"{'b' * 64}:3"]


def test_skipped_clips_are_not_read(tmp_path, caplog):
    store = InputStore(tmp_path)
    for n in range(3):
        store.put(f"{n:064x}", "t", "tiny", _clip(n))
    input_path(tmp_path, f"{1:064x}").write_bytes(b"not an npz")  # would warn if read
    with caplog.at_level(logging.WARNING):
        got = [k.clip_id for k in store.scan(skip={f"{1:064x}"})]
    assert got == [f"{0:064x}", f"{2:064x}"] and "unreadable" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert len(list(store.scan())) == 2
    assert "unreadable" in caplog.text


def test_retention_removes_the_old_then_the_oldest_past_the_bytes(tmp_path):
    store = InputStore(tmp_path, max_bytes=10**9, max_age_days=1.0)
    for n in range(4):
        store.put(f"{n:064x}", "t", "tiny", _clip(n))
    old = input_path(tmp_path, f"{0:064x}")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert store.sweep() == 1 and not old.exists()
    size = input_path(tmp_path, f"{1:064x}").stat().st_size
    store.max_bytes = 2 * size  # room for the two newest
    os.utime(input_path(tmp_path, f"{1:064x}"), (time.time() - 60,) * 2)
    assert store.sweep() == 1
    assert sorted(k.clip_id for k in store.scan()) == [f"{2:064x}", f"{3:064x}"]
