"""Drift statistics, the drift monitor, probe evaluation and the forgetting tracker."""

from __future__ import annotations

import io
import math

import pytest
import torch

from tests.worker.core.test_mmd import gaussian  # samples shared with the MMD tests
from worker.core.learner import Batch, build_learner
from worker.core.media import IMAGENET_MEAN, IMAGENET_STD
from worker.core.model import preset
from worker.core.monitors import (
    CompatibilityTracker,
    DriftConfig,
    DriftMonitor,
    DriftReport,
    ForgettingTracker,
    ProbeEvaluation,
    check_lags,
    clip_brightness,
    clip_loudness,
    evaluate_probes,
    fixed_masks,
    mean_shift,
    reconstruction_loss,
)

# ---- mean shift and input statistics -----------------------------------------------------


def test_mean_shift_is_the_distance_of_the_means():
    x = gaussian(50, 4, 0)
    c = torch.tensor([3.0, 0.0, 4.0, 0.0])
    assert mean_shift(x, x + c, normalise=False) == pytest.approx(5.0, rel=1e-9)
    total_var = float((x - x.mean(0)).pow(2).sum(1).mean())
    assert mean_shift(x, x + c) == pytest.approx(5.0 / math.sqrt(total_var), rel=1e-6)
    assert mean_shift(2 * x, 2 * (x + c)) == pytest.approx(mean_shift(x, x + c), rel=1e-6)


def test_mean_shift_in_standard_deviations_for_a_per_dimension_shift():
    shift = mean_shift(gaussian(2000, 16, 0), gaussian(2000, 16, 1, 0.5))
    assert shift == pytest.approx(0.5, abs=0.05)  # 0.5 * sqrt(D) / sqrt(D)


def test_loudness_and_brightness_of_known_inputs():
    fbank = torch.stack([torch.full((8, 4), -1.0), torch.full((8, 4), 2.0)])
    assert clip_loudness(fbank).tolist() == [-1.0, 2.0]
    grey = torch.full((1, 2, 3, 4, 4), 0.25)
    white = torch.ones(1, 2, 3, 4, 4)
    frames = torch.cat(
        [(grey - IMAGENET_MEAN) / IMAGENET_STD, (white - IMAGENET_MEAN) / IMAGENET_STD]
    )
    assert clip_brightness(frames).tolist() == pytest.approx([0.25, 1.0], abs=1e-6)


# ---- drift monitor -----------------------------------------------------------------------


def feed(monitor: DriftMonitor, n: int, seed: int, shift: float, loud: float = 0.0) -> None:
    emb = gaussian(n, 16, seed, shift)
    monitor.update({"audio": emb, "video": -emb}, {"loudness": torch.full((n,), loud)})


def test_drift_monitor_fills_reference_then_recent_and_reports_when_both_have_enough():
    monitor = DriftMonitor(DriftConfig(window=16, min_samples=4))
    feed(monitor, 16, 0, 0.0)
    assert monitor.sizes() == (16, 0) and monitor.report() is None
    feed(monitor, 3, 1, 0.0)
    assert monitor.report() is None
    feed(monitor, 30, 2, 0.0)
    assert monitor.sizes() == (16, 16)  # the recent window keeps the last 16 only
    report = monitor.report()
    assert report is not None and set(report.modalities) == {"audio", "video"}
    assert (report.reference_size, report.recent_size) == (16, 16)


def test_drift_monitor_sees_a_shift_and_rereference_forgets_the_old_reference():
    def report_after(shift: float, loud: float):
        m = DriftMonitor(DriftConfig(window=32, min_samples=8))
        m.update({"audio": gaussian(32, 16, 0)}, {"loudness": torch.linspace(-1, 1, 32)})
        m.update({"audio": gaussian(32, 16, 1, shift)}, {"loudness": torch.full((32,), loud)})
        return m

    calm = report_after(0.0, 0.0).report()
    m = report_after(1.0, 2.0)
    drifted = m.report()
    assert drifted.modalities["audio"].mmd2 > 5 * max(abs(calm.modalities["audio"].mmd2), 0.01)
    assert drifted.modalities["audio"].mean_shift > 3 * calm.modalities["audio"].mean_shift
    assert drifted.inputs["loudness"].recent == pytest.approx(2.0)
    assert drifted.inputs["loudness"].zscore > 3.0
    m.rereference()
    assert m.sizes() == (0, 0) and m.report() is None


def test_drifted_is_a_false_alarm_at_most_alpha_over_both_modalities(one_thread):
    """300 independent monitors, two modalities, nothing drifts: each test runs at alpha / 2
    (Bonferroni), so "drifted" comes at most alpha of the time. Measured at alpha 0.05:
    12 of 300 (0.040); with the recent audio shifted by 0.5 per dimension: 50 of 50."""
    calm = [drifted_after(seed, 0.0) for seed in range(300)]
    shifted = [drifted_after(seed, 0.5) for seed in range(50)]
    assert sum(calm) <= 300 * 0.05 + 2.5 * math.sqrt(300 * 0.05 * 0.95), sum(calm)
    assert sum(calm) >= 3  # the level is used, not an over-cautious test that never fires
    assert all(shifted)


def drifted_after(seed: int, audio_shift: float) -> bool:
    """One report of a fresh monitor: windows of 32 clips, embeddings N(0, I) in 8 dims."""
    g = torch.Generator().manual_seed(seed)
    monitor = DriftMonitor(DriftConfig(window=32, alpha=0.05, permutations=199, seed=seed))
    for shift in (0.0, audio_shift):
        emb = {"audio": torch.randn(32, 8, generator=g) + shift}
        monitor.update({**emb, "video": torch.randn(32, 8, generator=g)}, {})
    report = monitor.report()
    assert report is not None and monitor.level == 0.025
    return report.drifted


def test_drift_config_refuses_windows_too_small_for_the_estimator():
    with pytest.raises(ValueError):
        DriftConfig(window=8, min_samples=1)
    with pytest.raises(ValueError):
        DriftConfig(window=4, min_samples=8)


# ---- forgetting tracker ------------------------------------------------------------------


def evaluation(step: int, r1: float, recon: float | None = None) -> ProbeEvaluation:
    table = {"r1": r1, "r5": r1 + 10, "r10": r1 + 20, "avg": r1 + 10}
    return ProbeEvaluation(step, {"a2v": table, "v2a": dict(table)}, recon)


def test_forgetting_is_best_so_far_minus_current_on_a_scripted_sequence():
    tracker = ForgettingTracker()
    script = [(10.0, 2.0), (30.0, 1.5), (20.0, 1.8), (25.0, 1.4), (5.0, 2.5)]
    expected = [0.0, 0.0, 10.0, 5.0, 25.0]
    for step, ((r1, recon), want) in enumerate(zip(script, expected, strict=True)):
        tracker.record("seg-0", evaluation(step, r1, recon))
        state = tracker.state("seg-0")
        assert state.forgetting["a2v"]["r1"] == pytest.approx(want)
        assert state.best["a2v"]["r1"] == max(r for r, _ in script[: step + 1])
        assert state.current["a2v"]["r1"] == r1
    state = tracker.state("seg-0")
    assert (state.evaluations, state.step) == (5, 4)
    assert state.recon_best == 1.4 and state.recon_increase == pytest.approx(1.1)
    assert len(tracker.history("seg-0")) == 5


def test_forgetting_averages_over_windows_and_excludes_the_current_one():
    tracker = ForgettingTracker()
    for step, (a, b, c) in enumerate([(40, 10, 0), (30, 30, 0), (35, 20, 50)]):
        tracker.record("a", evaluation(step, a))
        tracker.record("b", evaluation(step, b))
        tracker.record("c", evaluation(step, c))
    # forgetting of R@1: a = 40 - 35 = 5, b = 30 - 20 = 10, c = 50 - 50 = 0
    assert tracker.averages().forgetting["a2v"]["r1"] == pytest.approx(5.0)
    past = tracker.averages(exclude={"c"})
    assert past.windows == ["a", "b"]
    assert past.forgetting["v2a"]["r1"] == pytest.approx(7.5)
    assert past.recall["a2v"]["r1"] == pytest.approx(27.5)
    assert tracker.averages(exclude={"a", "b", "c"}).forgetting == {}
    tracker.drop("a")
    assert tracker.windows() == ["b", "c"]
    summary = tracker.summary(exclude={"c"})
    assert summary["average"]["forgetting"]["a2v"]["r1"] == pytest.approx(10.0)
    assert summary["windows"]["c"]["forgetting"]["a2v"]["r1"] == 0.0


# ---- probe evaluation with a real tiny learner -------------------------------------------


@pytest.fixture(scope="module")
def learner():
    return build_learner("finetune", preset("tiny"))


def random_batch(n: int, seed: int) -> Batch:
    cfg = preset("tiny")
    g = torch.Generator().manual_seed(seed)
    fbank = torch.randn(n, cfg.audio_frames, cfg.mel_bins, generator=g)
    frames = torch.randn(n, cfg.num_frames, 3, cfg.frame_size, cfg.frame_size, generator=g)
    return Batch(fbank, frames)


def test_probe_evaluation_is_repeatable_and_changes_nothing(learner):
    batch = random_batch(6, 0)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    gen_state = learner.generator.get_state()
    learner.model.train()
    first = evaluate_probes(learner, batch, step=3)
    second = evaluate_probes(learner, batch, step=3)
    assert first == second and first.probes == 6 and first.step == 3
    assert set(first.recall) == {"a2v", "v2a"} and set(first.recall["a2v"]) >= {"r1", "r5", "r10"}
    assert first.recon is not None and math.isfinite(first.recon) and first.recon > 0
    assert learner.model.training  # mode restored
    assert torch.equal(learner.generator.get_state(), gen_state)  # the learner's draws untouched
    assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())


def test_reconstruction_loss_does_not_depend_on_chunking_and_sees_other_clips(learner):
    batch = random_batch(5, 1)
    whole = reconstruction_loss(learner, batch, chunk=32)
    chunked = reconstruction_loss(learner, batch, chunk=2)
    # same masks in the same order, so only float rounding differs
    assert chunked == pytest.approx(whole, rel=1e-5)
    assert reconstruction_loss(learner, random_batch(5, 2)) != pytest.approx(whole, rel=1e-6)
    assert evaluate_probes(learner, batch, 0, with_recon=False).recon is None


def test_fixed_masks_are_per_clip_and_do_not_move_when_probes_join():
    cfg = preset("tiny")
    small, large = fixed_masks(cfg, 3, seed=0), fixed_masks(cfg, 5, seed=0)
    assert all(torch.equal(a, b[:3]) for a, b in zip(small, large, strict=True))
    vis_a, tgt_a, vis_v, tgt_v = large
    assert vis_a.shape == (5, cfg.n_visible(cfg.num_audio_tokens))
    for vis, tgt, total in (
        (vis_a, tgt_a, cfg.num_audio_tokens),
        (vis_v, tgt_v, cfg.num_video_tokens),
    ):
        both = torch.cat([vis, tgt], dim=1).sort(dim=1).values
        assert torch.equal(both, torch.arange(total).expand(5, -1))  # a split of every token
    assert not torch.equal(vis_a[0], vis_a[1])


def test_probe_evaluation_needs_two_probes(learner):
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_probes(learner, random_batch(1, 0), 0)


# ---- state round trips (what the worker's checkpoint carries) ----------------------------


def saved_and_loaded(state: dict) -> dict:
    """Through torch.save and torch.load(weights_only=True), as a checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_tracker_state_round_trip_gives_the_same_states_and_averages():
    tracker = ForgettingTracker()
    for step, (a, b) in enumerate([(40, 10), (30, 30), (35, 20)]):
        tracker.record("a", evaluation(step, a, recon=1.0 + step))
        tracker.record("b", evaluation(step, b))
    restored = ForgettingTracker()
    restored.load_state_dict(saved_and_loaded(tracker.state_dict()))
    assert restored.windows() == ["a", "b"]
    assert restored.summary(exclude={"b"}) == tracker.summary(exclude={"b"})
    assert restored.state("a").best["a2v"]["r1"] == 40 and restored.state("a").recon_best == 1.0
    assert restored.history("b") == tracker.history("b")
    for tr in (tracker, restored):  # both go on the same way
        tr.record("a", evaluation(3, 45, recon=0.5))
    assert restored.state("a") == tracker.state("a")


def test_tracker_keeps_best_and_count_over_every_evaluation_and_a_bounded_history():
    tracker = ForgettingTracker(keep=3)
    for step, r1 in enumerate([50, 10, 20, 30, 25]):
        tracker.record("a", evaluation(step, r1, recon=float(step)))
    state = tracker.state("a")
    assert [e.step for e in tracker.history("a")] == [2, 3, 4]
    assert (state.evaluations, state.best["a2v"]["r1"], state.recon_best) == (5, 50, 0.0)
    assert state.forgetting["a2v"]["r1"] == 25
    assert len(tracker.state_dict()["a"]["history"]) == 3


def test_drift_monitor_state_round_trip_gives_the_same_report():
    monitor = DriftMonitor(DriftConfig(window=8, min_samples=4))
    feed(monitor, 8, 0, 0.0)
    feed(monitor, 11, 1, 0.7, loud=1.0)
    restored = DriftMonitor(DriftConfig(window=8, min_samples=4))
    restored.load_state_dict(saved_and_loaded(monitor.state_dict()))
    assert restored.sizes() == (8, 8)
    assert restored.report() == monitor.report()
    feed(monitor, 3, 2, 0.0)
    feed(restored, 3, 2, 0.0)
    assert restored.report() == monitor.report()
    report = monitor.report()
    assert report is not None and DriftReport.from_dict(report.as_dict()) == report
    empty = DriftMonitor()
    empty.load_state_dict(saved_and_loaded(DriftMonitor().state_dict()))
    assert empty.sizes() == (0, 0)


# ---- cross-version retrieval -------------------------------------------------------------


def basis(n: int, shift: int = 0) -> torch.Tensor:
    """(n, n): row i is the unit vector e_{(i + shift) mod n}."""
    return torch.eye(n).roll(shift, dims=1)


def test_cross_version_r1_is_current_queries_against_the_lagged_gallery():
    tracker = CompatibilityTracker(lags=(0, 1, 2))
    # version 3.10: pairs aligned; 3.20: video moved by one clip; 3.30: audio moved too
    assert tracker.record("w", "3.10", 10, basis(4), basis(4)) == tracker.report("w")
    [lag0] = tracker.report("w")  # lag 1 and 2: no gallery that old yet
    assert (lag0.lag, lag0.query_version, lag0.gallery_version) == (0, "3.10", "3.10")
    assert lag0.same == lag0.cross == {"a2v": 100.0, "v2a": 100.0}
    assert lag0.ratio == {"a2v": 1.0, "v2a": 1.0} and lag0.chance == 25.0
    tracker.record("w", "3.20", 20, basis(4), basis(4, 1))
    _, lag1 = tracker.report("w")
    # same version: a_i = e_i finds v_{i-1} = e_i: R@1 0, the ratio undefined (None)
    assert lag1.same == {"a2v": 0.0, "v2a": 0.0} and lag1.ratio == {"a2v": None, "v2a": None}
    # against 3.10's gallery: a_i = e_i finds old v_i = e_i; v_i = e_{i+1} finds old a_{i+1}
    assert lag1.cross == {"a2v": 100.0, "v2a": 0.0}
    assert (lag1.gallery_version, lag1.gallery_step, lag1.updates_apart) == ("3.10", 10, 10)
    tracker.record("w", "4.30", 30, basis(4, 1), basis(4, 1))
    lag0, lag1, lag2 = tracker.report("w")
    assert lag0.ratio == {"a2v": 1.0, "v2a": 1.0}
    assert (lag1.gallery_version, lag2.gallery_version) == ("3.20", "3.10")
    assert lag2.updates_apart == 20  # N counts across generations (docs/versions.md)
    assert lag1.cross == {"a2v": 100.0, "v2a": 0.0}  # a_i = e_{i+1} finds 3.20's v_i
    assert lag2.cross == {"a2v": 0.0, "v2a": 0.0}  # nothing aligns with 3.10's space
    assert lag2.ratio == {"a2v": 0.0, "v2a": 0.0}
    # the history is bounded by the largest lag
    assert [e.version for e in tracker.history("w")] == ["3.10", "3.20", "4.30"]
    tracker.record("w", "4.40", 40, basis(4), basis(4))
    assert [e.version for e in tracker.history("w")] == ["3.20", "4.30", "4.40"]


def test_cross_version_compares_the_probes_both_versions_embedded():
    tracker = CompatibilityTracker(lags=(1,))
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 8, generator=g)
    tracker.record("w", "0.1", 1, old, old)
    new = torch.cat([old, torch.randn(2, 8, generator=g)])  # two probes joined since
    [figure] = tracker.record("w", "0.2", 2, new, new)
    assert figure.probes == 3 and figure.chance == pytest.approx(100 / 3)
    assert figure.cross == figure.same == {"a2v": 100.0, "v2a": 100.0}
    tracker.record("x", "0.3", 3, old[:1], old[:1])
    assert tracker.record("x", "0.4", 4, new, new) == []  # one common probe: no R@1


def test_compat_state_round_trip_and_lags_shrinking():
    tracker = CompatibilityTracker(lags=(1, 4))
    for n in range(6):
        emb = basis(5, n % 3)
        tracker.record("w", f"1.{n}", n, emb, emb.roll(1, 0))
    assert len(tracker.history("w")) == 5
    state = saved_and_loaded(tracker.state_dict())
    assert state["w"][0]["audio"].dtype == torch.float16
    restored = CompatibilityTracker(lags=(1, 4))
    restored.load_state_dict(state)
    assert restored.report("w") == tracker.report("w")
    smaller = CompatibilityTracker(lags=(1,))
    smaller.load_state_dict(state)
    assert [e.version for e in smaller.history("w")] == ["1.4", "1.5"]
    assert smaller.report("w") == tracker.report("w")[:1]
    off = CompatibilityTracker(lags=())
    off.load_state_dict(state)
    assert off.record("w", "1.6", 6, basis(5), basis(5)) == [] and off.windows() == []
    tracker.drop("w")
    assert tracker.windows() == [] and tracker.report("w") == []


def test_lags_are_bounded():
    assert check_lags([4, 1, 2, 1]) == (1, 2, 4)
    for bad in ([1, 2, 3, 4, 5], [17], [-1]):
        with pytest.raises(ValueError):
            check_lags(bad)
