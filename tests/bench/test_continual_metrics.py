"""The continual benchmark's figures on hand-made inputs (bench/continual/metrics.py)."""

from __future__ import annotations

import math

import pytest
import torch

from bench.continual.metrics import (
    auc,
    average_accuracy,
    chance,
    clip_aucs,
    forgetting,
    matrix,
    paired_test,
    summarize,
    union_retrieval,
)


def test_union_gallery_queries_compete_with_every_tasks_items():
    # task 0: clips 0, 1; task 1: clips 2, 3. Clip 1's audio is closest to clip 2's video
    # (another task's), so it misses at R@1 against the union though it would win in its own set
    v = torch.eye(4)
    a = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1.0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    groups = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    res = union_retrieval(a, v, groups)
    assert res[0]["a2v"]["r1"] == pytest.approx(50.0)
    assert res[1]["a2v"]["r1"] == pytest.approx(100.0)
    assert res[0]["a2v"]["r5"] == pytest.approx(100.0)  # k > gallery counts as the gallery
    # v2a: each of task 0's videos is still nearest its own audio
    assert res[0]["v2a"]["r1"] == pytest.approx(100.0)


def test_chance_is_k_over_the_union_gallery():
    c = chance(256)
    assert c["r1"] == pytest.approx(100 / 256)
    assert c["r10"] == pytest.approx(1000 / 256)
    assert c["avg"] == pytest.approx((1 + 5 + 10) * 100 / 256 / 3)
    assert chance(4)["r10"] == 100.0


def test_random_embeddings_score_near_chance_on_a_large_gallery():
    gen = torch.Generator().manual_seed(0)
    a, v = torch.randn(600, 16, generator=gen), torch.randn(600, 16, generator=gen)
    res = union_retrieval(a, v, [torch.arange(600)])[0]
    assert res["a2v"]["r10"] == pytest.approx(chance(600)["r10"], abs=1.5)


# R[l][k]: row l = after task l+1, column k = task k+1 (T = 3)
R = [
    [50.0, 10.0, 20.0],
    [30.0, 60.0, 25.0],
    [20.0, 40.0, 70.0],
]


def test_a_is_the_mean_of_the_final_row_and_f_follows_the_design_formula():
    assert average_accuracy(R) == pytest.approx((20 + 40 + 70) / 3)
    # k=1: max(50-20, 30-20) = 30; k=2: max(10-40, 60-40) = 20; F = (30 + 20) / 2
    assert forgetting(R) == pytest.approx(25.0)
    assert forgetting([[10.0, 0.0], [30.0, 50.0]]) == pytest.approx(-20.0)
    assert math.isnan(forgetting([[42.0]]))


def test_summary_reads_each_view_direction_and_metric():
    def rec(x: float) -> dict[str, float]:
        return {"r1": x, "r5": x + 10, "r10": x + 20, "avg": x + 10}

    rows = [
        {"instance": [{"a2v": rec(x), "v2a": rec(x / 2)} for x in row], "label": []} for row in R
    ]
    assert matrix(rows, "instance", "a2v", "r1") == R
    s = summarize(rows, "instance")
    assert s["a2v"]["A_r1"] == pytest.approx(average_accuracy(R))
    assert s["a2v"]["A_avg"] == pytest.approx(average_accuracy(R) + 10)
    assert s["a2v"]["F_avg"] == pytest.approx(25.0)
    assert s["v2a"]["F_r1"] == pytest.approx(12.5)


def test_auc_against_a_hand_computation():
    # positives 0.9, 0.5, 0.3; negatives 0.5, 0.2: pairs won 2 + 0.5 (tie) + 1 + 1 = ...
    # 0.9 beats both (2), 0.5 ties 0.5 (0.5) and beats 0.2 (1), 0.3 beats 0.2 (1): 4.5 / 6
    assert auc(torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.5, 0.2])) == pytest.approx(0.75)
    assert auc(torch.tensor([1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert math.isnan(auc(torch.tensor([1.0]), torch.tensor([])))


def test_clip_aucs_use_only_object_and_distractor_tokens():
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.9], [0.1, 0.2, 0.3, 0.4]])
    obj = torch.tensor([[True, False, False, False], [False, False, False, False]])
    dis = torch.tensor([[False, True, True, False], [True, False, False, False]])
    # clip 0: the object (0.4) beats both distractors; the background token 0.9 is ignored;
    # clip 1 has no object token: left out
    assert clip_aucs(scores, obj, dis) == [1.0]


def test_paired_test_against_hand_computations():
    ours, theirs = [3.0, 4.0, 5.0, 6.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]
    out = paired_test(ours, theirs)
    diffs = [2.0, 3.0, 4.0, 5.0, 8.0]
    assert out["diffs"] == diffs and out["mean_diff"] == pytest.approx(4.4)
    sd = math.sqrt(sum((d - 4.4) ** 2 for d in diffs) / 4)
    assert out["std_diff"] == pytest.approx(sd)
    from scipy.stats import t

    assert out["t_p"] == pytest.approx(2 * t.sf(4.4 / (sd / math.sqrt(5)), df=4))
    # every difference positive: the exact signed-rank p is 2 / 2^5
    assert out["wilcoxon_p"] == pytest.approx(2 / 32)


def test_paired_test_leaves_undefined_p_values_empty():
    assert paired_test([1.0, 2.0], [1.0, 2.0])["t_p"] is None  # no difference at all
    one = paired_test([1.0], [0.0])
    assert one["mean_diff"] == 1.0 and one["t_p"] is None and one["wilcoxon_p"] is None
    with pytest.raises(ValueError):
        paired_test([1.0, 2.0], [1.0])
