"""Page-Hinkley (worker/core/changepoint.py): a step is found within a bounded delay, a
stationary series (i.i.d., or the drift monitor's own z-score series) is never signalled."""

from __future__ import annotations

import math

import pytest
import torch

from worker.core.changepoint import ChangeDetector, PageHinkley, PageHinkleyConfig
from worker.core.monitors import DriftConfig, DriftMonitor


def signals(test: PageHinkley, values: list[float]) -> list[int]:
    return [i for i, v in enumerate(values) if test.update(v)]


def test_a_step_of_three_is_found_within_30_values_every_time():
    """N(0, 1) then N(3, 1) from value 500, 50 seeds: the delay is about lambda / (3 - delta)
    = 20 (measured: 15 to 26 values), never a signal before the step."""
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        values = torch.cat([torch.randn(500, generator=g), torch.randn(200, generator=g) + 3])
        found = signals(PageHinkley(), values.tolist())
        assert found and 500 <= found[0] <= 530, (seed, found)


def test_a_stationary_series_is_never_signalled():
    """200,000 i.i.d. N(0, 1) values (largest m_t - M_t measured: 6.5, lambda 40)."""
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        test = PageHinkley()
        assert signals(test, torch.randn(20_000, generator=g).tolist()) == []


def test_a_signal_starts_the_test_afresh_so_a_new_level_is_signalled_once():
    values = [0.0] * 50 + [10.0] * 200
    found = signals(PageHinkley(), values)
    assert len(found) == 1 and 50 <= found[0] <= 60


def test_undefined_values_are_skipped_and_small_rises_tolerated():
    test = PageHinkley(PageHinkleyConfig(delta=1.0, threshold=5.0))
    assert signals(test, [math.nan, math.inf] * 10) == [] and test.count == 0
    assert signals(test, [0.0] * 20 + [0.9] * 500) == []  # a rise under delta


def test_config_refuses_meaningless_knobs():
    for bad in ({"delta": -1.0}, {"threshold": 0.0}, {"min_values": 0}):
        with pytest.raises(ValueError):
            PageHinkleyConfig(**bad)


def drift_z_series(batches: int, shift_at: int, shift: float, seed: int) -> list[float]:
    """The z-score of the audio MMD^2 after each batch of 8 clips, windows of 64 (the worker's
    defaults), embeddings N(0, I) in 32 dimensions, shifted by ``shift`` per dimension."""
    g = torch.Generator().manual_seed(seed)
    monitor = DriftMonitor(DriftConfig(window=64, min_samples=16, permutations=199, seed=seed))
    out = []
    for b in range(batches):
        rows = torch.randn(8, 32, generator=g) + (shift if b >= shift_at else 0.0)
        monitor.update({"audio": rows}, {})
        report = monitor.report()
        if report is not None:
            out.append(report.modalities["audio"].zscore)
    return out


def test_the_drift_monitors_own_series_is_quiet_until_the_stream_shifts(one_thread):
    """The z-score series' consecutive values share 56 of their 64 recent clips, so it is
    far from i.i.d.: the defaults (delta 1, lambda 40) are set on it. Measured: no signal in
    800 batches without a shift (largest m_t - M_t 14.2); a shift of 0.3 per dimension found
    5 to 8 batches after it began (seeds 1-4: 7, 8, 5, 5)."""
    assert signals(PageHinkley(), drift_z_series(800, 10**9, 0.0, seed=0)) == []
    for seed in (1, 2):
        z = drift_z_series(100, 40, 0.3, seed)  # z[i] follows batch i + 6 (16 clips first)
        found = [i + 6 for i in signals(PageHinkley(), z)]
        assert found and 40 <= found[0] <= 40 + 12, found


def test_detector_counts_keeps_the_last_few_and_round_trips():
    detector = ChangeDetector(PageHinkleyConfig(delta=0.5, threshold=5.0, min_values=2), keep=2)
    found = []
    for step in range(60):
        level = 10.0 * (step // 20)  # steps up at 20 and 40
        found += detector.update({"audio": level, "video": 0.0}, step, f"1.{step}", 100.0 + step)
    assert [(c.series, c.step) for c in found] == [("audio", 20), ("audio", 40)]
    assert detector.counts == {"audio": 2} and detector.last()["audio"].version == "1.40"
    restored = ChangeDetector(detector.cfg, keep=2)
    restored.load_state_dict(detector.state_dict())
    assert restored.state_dict() == detector.state_dict()
    for d in (detector, restored):  # both go on the same way
        assert [c.step for c in d.update({"audio": 30.0}, 61, "1.61", 161.0)] == [61]
