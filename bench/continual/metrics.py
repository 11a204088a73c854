"""The protocol's figures (docs/design.md section 5): retrieval recall with
instance-level hits over the union gallery, A and F of an accuracy matrix, the localization
AUC, and paired tests over seeds.

Conventions: recall and chance in percent; R[l][k] is task k's figure after task l (rows in
training order); similarity matrices are (queries, gallery) with higher = more similar.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worker.core.retrieval import recall_at_k, recall_by_group

KS = (1, 5, 10)
DIRECTIONS = ("a2v", "v2a")
METRICS = ("r1", "r5", "r10", "avg")
VIEWS = ("instance", "label")  # headline first; "label" is the secondary view


# -- retrieval ---------------------------------------------------------------------------------


def chance(gallery: int, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Instance-level R@k of a random ranking: one correct item among ``gallery``: k / N."""
    out = {f"r{k}": 100.0 * min(k, gallery) / gallery for k in ks}
    out["avg"] = sum(out.values()) / len(ks)
    return out


def union_retrieval(a: Tensor, v: Tensor, groups: Sequence[Tensor]) -> list[dict[str, Any]]:
    """Instance-level recall of each group's queries against the union gallery of all clips
    (``worker.core.retrieval.recall_by_group``).

    a, v: (N, D) audio / video embeddings of the same N clips (row i is a pair); ``groups``:
    index tensors (one per task's held-out set) partitioning 0..N-1. Returns one
    ``{"a2v": recall, "v2a": recall}`` per group, in order."""
    labels = torch.empty(a.shape[0], dtype=torch.int64)
    for g, idx in enumerate(groups):
        labels[idx] = g
    by_group = recall_by_group(a, v, labels, KS)
    return [by_group[g] for g in range(len(groups))]


def label_retrieval(a: Tensor, v: Tensor, labels: Tensor) -> dict[str, Any]:
    """Secondary view: label-level hits inside one set's own gallery (same class counts)."""
    return recall_at_k(a, v, KS, labels=labels)


# -- A and F -------------------------------------------------------------------------------------


def average_accuracy(R: Sequence[Sequence[float]]) -> float:
    """A: mean of the final row of R[l][k]."""
    return float(np.mean(R[-1]))


def forgetting(R: Sequence[Sequence[float]]) -> float:
    """F = 1/(T-1) sum_{k<T} max_{l<T} (R[l][k] - R[T][k]), docs/design.md section 5 (1-based l, k).

    Rows are the evaluations after tasks 1..T; NaN when T < 2.
    """
    T = len(R)
    if T < 2:
        return math.nan
    final = R[-1]
    drops = [max(R[l][k] - final[k] for l in range(T - 1)) for k in range(T - 1)]
    return float(np.mean(drops))


def matrix(rows: list[dict[str, Any]], view: str, direction: str, metric: str) -> list[list]:
    """R[l][k] of one figure (e.g. view "instance", direction "a2v", metric "r1") from the
    evaluations after each task, ``rows``."""
    return [[res[direction][metric] for res in row[view]] for row in rows]


def summarize(rows: list[dict[str, Any]], view: str) -> dict[str, dict[str, float]]:
    """{direction: {"A_r1", "F_r1", ..., "A_avg", "F_avg"}} of one view."""
    out: dict[str, dict[str, float]] = {}
    for d in DIRECTIONS:
        out[d] = {}
        for m in METRICS:
            R = matrix(rows, view, d, m)
            out[d][f"A_{m}"] = average_accuracy(R)
            out[d][f"F_{m}"] = forgetting(R)
    return out


# -- localization ------------------------------------------------------------------------------


def auc(positive: Tensor, negative: Tensor) -> float:
    """ROC AUC: the probability that a positive scores above a negative (ties count half);
    NaN when either side is empty."""
    if positive.numel() == 0 or negative.numel() == 0:
        return math.nan
    diff = positive.reshape(-1, 1).double() - negative.reshape(1, -1).double()
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def clip_aucs(scores: Tensor, positive: Tensor, negative: Tensor) -> list[float]:
    """Per-clip AUC of (B, L) token scores ranking ``positive`` tokens above ``negative`` ones
    (both (B, L) bool); clips lacking either kind are left out."""
    out = []
    for s, pos, neg in zip(scores, positive, negative & ~positive, strict=True):
        if pos.any() and neg.any():
            out.append(auc(s[pos], s[neg]))
    return out


# -- over seeds ----------------------------------------------------------------------------------


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """mean, sample std (None for one value), n, and the values; None / NaN dropped."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals), "values": vals}


def paired_test(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, Any]:
    """Seed-by-seed comparison: the differences ours - theirs, their mean and std, the paired
    t-test's and the Wilcoxon signed-rank test's two-sided p-values (None where undefined:
    fewer than 2 pairs, or every difference zero)."""
    from scipy import stats as st

    # rounded: figures that differ by float noise only count as equal
    x, y = np.round(np.asarray(ours, dtype=float), 9), np.round(np.asarray(theirs, dtype=float), 9)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {len(x)} vs {len(y)}")
    diff = x - y
    out: dict[str, Any] = {
        "n": len(diff),
        "diffs": diff.tolist(),
        "mean_diff": float(diff.mean()) if len(diff) else None,
        "std_diff": float(diff.std(ddof=1)) if len(diff) > 1 else None,
        "t_p": None,
        "wilcoxon_p": None,
    }
    if len(diff) < 2 or not np.any(diff):
        return out
    t_p = float(st.ttest_rel(x, y).pvalue)
    out["t_p"] = None if math.isnan(t_p) else t_p
    out["wilcoxon_p"] = float(st.wilcoxon(x, y).pvalue)
    return out
