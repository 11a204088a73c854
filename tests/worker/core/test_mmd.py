"""MMD^2 (worker/core/mmd.py): the statistic, and the permutation test's false-alarm rate
under no drift and its power under a shift."""

from __future__ import annotations

import math

import pytest
import torch

from worker.core.mmd import (
    median_bandwidth,
    mmd2_of_splits,
    mmd2_permutation_test,
    mmd2_rbf,
    random_splits,
    rbf_gram,
    rejection_threshold,
)


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


# ---- MMD^2 -------------------------------------------------------------------------------


def test_mmd2_near_zero_for_same_distribution_and_positive_for_shifted():
    same = [mmd2_rbf(gaussian(64, 32, s), gaussian(64, 32, s + 100)) for s in range(10)]
    shifted = [mmd2_rbf(gaussian(64, 32, s), gaussian(64, 32, s + 100, 0.5)) for s in range(10)]
    assert max(abs(x) for x in same) < 0.02
    assert min(shifted) > 0.05
    assert min(shifted) > 5 * max(abs(x) for x in same)


def test_mmd2_grows_with_the_shift():
    x = gaussian(64, 16, 0)
    values = [mmd2_rbf(x, gaussian(64, 16, 1, s)) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert values[-1] < 2.0  # an RBF kernel's MMD^2 is at most 2


def test_mmd2_matches_a_brute_force_u_statistic():
    x, y = gaussian(5, 3, 0).double(), gaussian(7, 3, 1, 0.3).double()
    h = 2.5

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / h)

    kxx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    kyy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    kxy = sum(k(x[i], y[j]) for i in range(5) for j in range(7)) / (5 * 7)
    assert mmd2_rbf(x, y, bandwidth=h) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9)


def test_median_bandwidth_is_the_median_pairwise_squared_distance():
    z = torch.tensor([[0.0], [1.0], [3.0]])  # squared distances 1, 9, 4 (each twice)
    assert median_bandwidth(z) == pytest.approx(4.0)
    assert median_bandwidth(torch.ones(4, 3)) == 1.0  # degenerate sample: kernel stays defined


def test_mmd2_is_symmetric_and_invariant_to_translation_and_scale():
    x, y = gaussian(32, 8, 0), gaussian(40, 8, 1, 0.4)
    base = mmd2_rbf(x, y)
    assert mmd2_rbf(y, x) == pytest.approx(base, rel=1e-9)
    assert mmd2_rbf(x + 7.0, y + 7.0) == pytest.approx(base, rel=1e-6)
    assert mmd2_rbf(3.0 * x, 3.0 * y) == pytest.approx(base, rel=1e-6)  # median bandwidth


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (torch.zeros(1, 4), torch.zeros(5, 4)),
        (torch.zeros(5, 4), torch.zeros(5, 3)),
        (torch.zeros(5), torch.zeros(5)),
    ],
)
def test_mmd2_refuses_unusable_samples(x, y):
    with pytest.raises(ValueError):
        mmd2_rbf(x, y)


# ---- the permutation test ----------------------------------------------------------------


def test_mmd2_of_splits_equals_the_statistic_of_the_rows_each_split_picks():
    x, y = gaussian(6, 4, 0), gaussian(9, 4, 1, 0.5)
    pooled = torch.cat([x, y]).double()
    h = median_bandwidth(pooled)
    splits = random_splits(6, 9, 5, torch.Generator().manual_seed(0))
    assert splits.shape == (5, 15) and splits.sum(1).tolist() == [6] * 5
    observed = torch.cat([torch.ones(6), torch.zeros(9)]).bool().unsqueeze(0)
    got = mmd2_of_splits(rbf_gram(pooled, h), torch.cat([observed, splits]))
    want = [mmd2_rbf(x, y, bandwidth=h)]
    want += [mmd2_rbf(pooled[s], pooled[~s], bandwidth=h) for s in splits]
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_the_threshold_and_the_p_value_make_the_same_decision(one_thread):
    g, draws = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    decisions = []
    for shift in [0.0] * 20 + [0.3] * 20:
        x, y = torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g) + shift
        test = mmd2_permutation_test(x, y, 0.05, 99, draws)
        assert test.mmd2 == pytest.approx(mmd2_rbf(x, y), rel=1e-9, abs=1e-12)
        assert (test.pvalue <= 0.05) == (test.mmd2 > test.threshold)
        assert 1 / 100 <= test.pvalue <= 1.0
        decisions.append(test.pvalue <= 0.05)
    assert any(decisions) and not all(decisions)  # both branches were compared


def test_rejection_threshold_is_the_null_quantile_the_p_value_implies():
    null = torch.arange(1.0, 100.0)  # 99 draws: 1 .. 99
    assert rejection_threshold(null, 0.05) == 95.0  # above 95: at most 4 draws >= it, p <= 0.05
    assert rejection_threshold(null, 0.01) == 99.0  # (99 + 1) * 0.01 = 1: above every draw
    assert rejection_threshold(null, 0.005) == math.inf  # 99 draws cannot give p <= 0.005


@pytest.mark.parametrize(("level", "permutations", "trials"), [(0.05, 99, 600), (0.01, 199, 1500)])
def test_false_alarm_rate_under_no_drift_is_near_the_level(one_thread, level, permutations, trials):
    """Both samples from one distribution: the share of rejections is the level, within
    about 2.5 binomial standard deviations (measured: 36 of 600 = 0.060 at 0.05, 16 of 1,500 =
    0.0107 at 0.01)."""
    g, draws = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    rejected = 0
    for _ in range(trials):
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
        rejected += mmd2_permutation_test(x, y, level, permutations, draws).pvalue <= level
    sd = math.sqrt(trials * level * (1 - level))
    assert abs(rejected - trials * level) <= 2.5 * sd, rejected / trials


def test_a_real_shift_is_rejected_and_stands_far_above_its_null(one_thread):
    g, draws = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    for _ in range(10):
        x, y = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g) + 0.5
        test = mmd2_permutation_test(x, y, 0.005, 999, draws)
        assert test.pvalue == 1 / 1000 and test.mmd2 > test.threshold
        assert test.zscore > 10


def test_the_test_repeats_exactly_with_the_same_generator_state():
    x, y = gaussian(16, 4, 0), gaussian(16, 4, 1, 0.2)
    runs = [mmd2_permutation_test(x, y, 0.05, 99, torch.Generator().manual_seed(5)) for _ in "ab"]
    assert runs[0] == runs[1]
