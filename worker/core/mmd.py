"""MMD^2 between two samples, and a permutation test that turns it into a decision.

The statistic (``mmd2_rbf``) is the unbiased MMD^2 with an RBF kernel and the median
bandwidth. Alone it is a number without a scale: how large is "drifted" depends on the
embedding width, the window sizes and the bandwidth. ``mmd2_permutation_test`` calibrates it
on the samples themselves: under "same distribution" the rows of x and y are exchangeable, so
the statistic of random relabellings of the pooled rows is a draw from its null distribution.
Its p-value is exact at any sample size (a test at level ``level`` rejects a true null with
probability at most ``level``), and the threshold is the null quantile above which the
statistic rejects (reject <=> mmd2 > threshold <=> p-value <= level).

The bandwidth is the median over the *pooled* sample, which a relabelling does not change, so
one Gram matrix serves the observed statistic and every permuted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances, clamped at 0."""
    d = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
    return d.clamp_min(0.0)


def median_bandwidth(z: Tensor) -> float:
    """Median of the pairwise squared distances between distinct rows of z (K, D).

    The RBF bandwidth h of the median heuristic: k(a, b) = exp(-||a - b||^2 / h).
    A degenerate sample (all rows equal) gives 1.0, so the kernel stays defined.
    """
    d = squared_distances(z, z)
    off = d[~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)]
    h = float(off.median()) if off.numel() else 0.0
    return h if h > 1e-12 else 1.0


def mmd2_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 between samples x (N, D) and y (M, D) with an RBF kernel.

    k(a, b) = exp(-||a - b||^2 / h), h = ``bandwidth`` or the median pairwise squared
    distance over the pooled sample [x; y] (median heuristic). The estimator is the
    U-statistic (diagonals excluded): mean k(x, x') + mean k(y, y') - 2 mean k(x, y).
    It is about 0 for samples of one distribution (it can dip slightly below 0) and
    grows towards 2 as they separate. Needs N, M >= 2.
    """
    x, y = _pair(x, y)
    n, m = x.shape[0], y.shape[0]
    h = bandwidth if bandwidth is not None else median_bandwidth(torch.cat([x, y]))
    kxx = torch.exp(-squared_distances(x, x) / h)
    kyy = torch.exp(-squared_distances(y, y) / h)
    kxy = torch.exp(-squared_distances(x, y) / h)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Two samples checked ((N, D), (M, D), N, M >= 2) and moved to float64 on the CPU."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) samples, got {tuple(x.shape)}, {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"unbiased MMD^2 needs at least 2 rows per sample, got {n} and {m}")
    return x.detach().double().cpu(), y.detach().double().cpu()


# ---------------------------------------------------------------------------------------
# the permutation test


@dataclass(frozen=True)
class MMDTest:
    """The observed MMD^2 against its permutation null at one level."""

    mmd2: float  # the unbiased MMD^2 of x against y
    pvalue: float  # (1 + #{permuted >= observed}) / (1 + permutations), never 0
    threshold: float  # reject (pvalue <= level) exactly when mmd2 > threshold; inf: never
    null_mean: float  # mean and standard deviation of the permuted statistics
    null_std: float

    @property
    def zscore(self) -> float:
        """The statistic in null standard deviations above the null mean (scale-free)."""
        return (self.mmd2 - self.null_mean) / max(self.null_std, 1e-12)


def rbf_gram(z: Tensor, bandwidth: float) -> Tensor:
    """z (K, D) -> (K, K) kernel matrix exp(-||z_i - z_j||^2 / bandwidth)."""
    return torch.exp(-squared_distances(z, z) / bandwidth)


def mmd2_of_splits(gram: Tensor, in_x: Tensor) -> Tensor:
    """Unbiased MMD^2 of several splits of one pooled sample at once.

    gram (K, K) kernel matrix of the pooled rows; in_x (P, K) bool, row p marks the rows that
    form x in split p (the same count n in every split; y is the rest, m = K - n) -> (P,).
    Sums over blocks come from a = 1[x], b = 1[y]: sum k(x, x') = a^T G a, and so on; the
    diagonal is left out of the within-sample means (the U-statistic).
    """
    a = in_x.to(gram.dtype)
    b = 1.0 - a
    n, m = float(a[0].sum()), float(b[0].sum())
    ga = a @ gram  # (P, K)
    sxx, sxy = (ga * a).sum(1), (ga * b).sum(1)
    syy = gram.sum() - sxx - 2.0 * sxy
    diag = gram.diagonal()
    within_x = (sxx - a @ diag) / (n * (n - 1))
    within_y = (syy - b @ diag) / (m * (m - 1))
    return within_x + within_y - 2.0 * sxy / (n * m)


def random_splits(n: int, m: int, count: int, generator: torch.Generator) -> Tensor:
    """(count, n + m) bool: each row a uniformly random choice of n of the n + m rows."""
    order = torch.rand(count, n + m, generator=generator).argsort(dim=1)
    return order < n


def mmd2_permutation_test(
    x: Tensor,
    y: Tensor,
    level: float,
    permutations: int,
    generator: torch.Generator,
) -> MMDTest:
    """MMD^2 of x (N, D) against y (M, D) and its permutation p-value and threshold.

    Under "x and y come from one distribution" the test rejects (pvalue <= level) with
    probability at most ``level``; ``threshold`` is finite once (permutations + 1) * level >= 1.
    """
    x, y = _pair(x, y)
    n, m = x.shape[0], y.shape[0]
    pooled = torch.cat([x, y])
    gram = rbf_gram(pooled, median_bandwidth(pooled))
    observed_split = (torch.arange(n + m) < n).unsqueeze(0)
    observed = float(mmd2_of_splits(gram, observed_split)[0])
    null = mmd2_of_splits(gram, random_splits(n, m, permutations, generator))
    exceed = int((null >= observed).sum())
    return MMDTest(
        mmd2=observed,
        pvalue=(1 + exceed) / (1 + permutations),
        threshold=rejection_threshold(null, level),
        null_mean=float(null.mean()),
        null_std=float(null.std()),
    )


def rejection_threshold(null: Tensor, level: float) -> float:
    """The value the statistic must exceed for pvalue <= level, given the null draws (P,).

    pvalue = (1 + c) / (1 + P) with c the draws >= the statistic, so pvalue <= level holds
    when c <= k = floor(level * (P + 1)) - 1, i.e. when the statistic exceeds the (k+1)-th
    largest draw. k < 0: no statistic can reach the level with this many draws (inf).
    """
    k = math.floor(level * (null.numel() + 1) + 1e-9) - 1
    if k < 0:
        return math.inf
    return float(null.sort(descending=True).values[min(k, null.numel() - 1)])
