"""Retrieval R@K on hand-made embeddings whose rankings are known."""

from __future__ import annotations

import pytest
import torch

from worker.core.retrieval import recall_against, recall_at_k


def test_perfect_pairs_score_100() -> None:
    emb = torch.randn(20, 8)
    res = recall_at_k(emb, emb)
    assert res["a2v"] == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "avg": 100.0}
    assert res["v2a"]["avg"] == 100.0


def test_hand_made_rankings() -> None:
    # unit vectors at 0, 20 and 70 degrees; video i is audio i + 1's direction
    ang = torch.deg2rad(torch.tensor([0.0, 20.0, 70.0]))
    a = torch.stack([ang.cos(), ang.sin()], 1)
    v = a.roll(-1, 0)  # v at 20, 70, 0 degrees
    res = recall_at_k(a, v, ks=(1, 2))
    # a2v: a0 ranks v2, v0, v1 (true v0 second); a1 and a2 find their pair third
    assert res["a2v"] == pytest.approx({"r1": 0.0, "r2": 100 / 3, "avg": 50 / 3})
    # v2a: v0 ranks a1, a0 (second); v1 ranks a2, a1 (second); v2 ranks a0, a1, a2 (third)
    assert res["v2a"] == pytest.approx({"r1": 0.0, "r2": 200 / 3, "avg": 100 / 3})


def test_cosine_ignores_scale() -> None:
    a, v = torch.randn(15, 6), torch.randn(15, 6)
    scale = torch.rand(15, 1) + 0.5
    assert recall_at_k(a * scale, v * 3) == recall_at_k(a, v)


def test_labels_count_any_item_of_the_same_class() -> None:
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    v = torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.1, 0.9], [0.0, 1.0]])  # pairs swapped in class
    assert recall_at_k(a, v, ks=(1,))["a2v"]["r1"] == 0.0
    labels = torch.tensor([0, 0, 1, 1])
    assert recall_at_k(a, v, ks=(1,), labels=labels)["a2v"]["r1"] == 100.0


def test_k_beyond_n_counts_every_item_and_bad_input_raises() -> None:
    a, v = torch.randn(4, 3), torch.randn(4, 3)
    assert recall_at_k(a, v)["a2v"]["r10"] == 100.0
    with pytest.raises(ValueError, match="same"):
        recall_at_k(a, v[:3])
    with pytest.raises(ValueError, match="labels"):
        recall_at_k(a, v, labels=torch.arange(3))


def test_recall_by_group_ranks_each_query_against_the_union_gallery():
    from worker.core.retrieval import recall_by_group

    # 4 clips in 2 groups; clip 1's audio is closest to clip 2's video (another group)
    v = torch.eye(4)
    a = torch.eye(4)
    a[1] = torch.tensor([0.0, 0.6, 0.8, 0.0])
    res = recall_by_group(a, v, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    assert res[0]["a2v"]["r1"] == 50.0  # clip 0 hits, clip 1 misses (gallery spans groups)
    assert res[0]["a2v"]["r2"] == 100.0
    assert res[1]["a2v"]["r1"] == 100.0
    with pytest.raises(ValueError):
        recall_by_group(a, v, torch.tensor([0, 1]))


def test_recall_against_is_one_direction_of_recall_at_k_and_takes_any_gallery() -> None:
    a, v = torch.randn(12, 5), torch.randn(12, 5)
    both = recall_at_k(a, v, ks=(1, 3))
    assert recall_against(a, v, (1, 3)) == both["a2v"]
    assert recall_against(v, a, (1, 3)) == both["v2a"]
    # a gallery whose row i is another clip's: no query finds its match first
    assert recall_against(a, a.roll(1, 0), (1,))["r1"] == 0.0
    assert recall_against(a, a * 2.0, (1,))["r1"] == 100.0  # cosine: scale does not matter
    with pytest.raises(ValueError):
        recall_against(a, v[:5])
