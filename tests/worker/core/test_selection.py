import pytest
import torch

from worker.core.selection import (
    ClipScores,
    SelectionConfig,
    audio_keep,
    candidates,
    chunk_grid,
    correlation,
    exclude,
    gather_tokens,
    random_keep,
    select,
    select_replay,
    topk_keep,
    video_keep,
    weighted_order,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _importance(g: torch.Generator, batch: int, length: int) -> torch.Tensor:
    return torch.rand(batch, length, generator=g).add(0.01).softmax(-1)


def _assert_distinct_in_range(keep: torch.Tensor, length: int, K: int) -> None:
    assert keep.dtype == torch.long and keep.shape[1] == K
    assert keep.min() >= 0 and keep.max() < length
    for row in keep:
        assert row.unique().numel() == K


def test_candidates_are_exactly_the_top_half():
    g = _gen(0)
    imp = _importance(g, 3, 784)
    cand = candidates(imp, 0.5)
    assert cand.sum(-1).tolist() == [392, 392, 392]
    for b in range(3):
        top = set(imp[b].argsort(descending=True)[:392].tolist())
        assert set(cand[b].nonzero().squeeze(1).tolist()) == top
    assert candidates(_importance(g, 1, 512), 0.5).sum() == 256


def test_correlation_hand_computed_one_head():
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # (1, 1, 3, 2)
    past = torch.tensor([[[2.0, 0.0]]])
    now = torch.tensor([[[0.0, 2.0]]])
    cand = torch.tensor([[True, True, False]])
    c = correlation(k, past, now, cand)
    s = 2**0.5  # sqrt(d)
    expected = torch.tensor(
        [[torch.sigmoid(torch.tensor(2 / s)), torch.sigmoid(torch.tensor(-2 / s)), 0.0]]
    )
    torch.testing.assert_close(c, expected)


def test_correlation_averages_heads():
    g = _gen(1)
    k, past, now = (
        torch.randn(2, 3, 5, 4, generator=g),
        torch.randn(2, 3, 4, generator=g),
        torch.randn(2, 3, 4, generator=g),
    )
    cand = torch.ones(2, 5, dtype=torch.bool)
    c = correlation(k, past, now, cand)
    h1 = correlation(k[:, 1:2], past[:, 1:2], now[:, 1:2], cand)
    manual = torch.stack(
        [
            correlation(k[:, h : h + 1], past[:, h : h + 1], now[:, h : h + 1], cand)
            for h in range(3)
        ]
    )
    torch.testing.assert_close(c, manual.mean(0))
    assert not torch.allclose(c, h1)


def test_exclusion_rate_matches_C():
    C = torch.tensor([[0.0, 0.1, 0.5, 0.9, 1.0]]).expand(4000, 5)
    e = exclude(C, _gen(2))
    assert e.dtype == torch.bool
    rate = e.float().mean(0)
    std = (C[0] * (1 - C[0]) / 4000).sqrt()
    assert ((rate - C[0]).abs() <= 4 * std + 1e-9).all()
    assert rate[0] == 0 and rate[4] == 1


@pytest.mark.parametrize("seed", range(25))
def test_video_keep_exactly_K_distinct(seed):
    g = _gen(seed)
    batch, length = 1 + seed % 4, 8 + 7 * seed
    K = 1 + int(torch.randint(0, length, (1,), generator=g))
    weights = _importance(g, batch, length)
    weights[torch.rand(batch, length, generator=g) < 0.7] = 0  # often fewer than K non-zero
    weights[0, :] = 0 if seed % 5 == 0 else weights[0, :]  # an all-zero row
    _assert_distinct_in_range(
        video_keep(weights, K, g, fallback=torch.rand(batch, length)), length, K
    )


def test_video_keep_never_takes_excluded_while_enough_others():
    g = _gen(3)
    for _ in range(20):
        imp = _importance(g, 4, 64)
        excluded = torch.rand(4, 64, generator=g) < 0.4
        keep = video_keep(imp * ~excluded, 20, g, fallback=imp)
        assert not excluded.gather(1, keep).any()


def test_video_keep_fills_from_excluded_by_importance():
    imp = torch.tensor([[0.05, 0.3, 0.1, 0.2, 0.15, 0.2]])
    excluded = torch.tensor([[False, True, False, True, True, False]])
    keep = video_keep(imp * ~excluded, 5, _gen(4), fallback=imp)
    assert set(keep[0, :3].tolist()) == {0, 2, 5}
    assert keep[0, 3:].tolist() == [1, 3]  # highest-importance excluded tokens, in order


def test_weighted_order_first_draw_is_proportional():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]]).expand(8000, 5)
    first = weighted_order(w, _gen(5))[:, 0]
    freq = torch.bincount(first, minlength=5).float() / 8000
    std = (w[0] * (1 - w[0]) / 8000).sqrt()
    assert ((freq - w[0]).abs() <= 4 * std + 1e-9).all()


def test_weighted_order_second_draw_is_without_replacement():
    w = torch.tensor([[0.5, 0.25, 0.25]]).expand(8000, 3)
    order = weighted_order(w, _gen(6))
    second_given_0 = order[order[:, 0] == 0, 1]
    p1 = (second_given_0 == 1).float().mean()  # P(1 | 0 first) = 0.25 / 0.5
    assert abs(float(p1) - 0.5) < 0.04


def test_chunk_grid_time_major_and_ragged():
    grid = chunk_grid(time_steps=6, freq_bins=2, chunk_time=4)
    assert grid.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, -1, -1, -1, -1]]


def _chunk_counts(keep: torch.Tensor, time_steps: int, freq_bins: int, chunk_time: int) -> list:
    mask = torch.zeros(time_steps * freq_bins, dtype=torch.bool)
    mask[keep] = True
    grid = chunk_grid(time_steps, freq_bins, chunk_time)
    return [(mask[row[row >= 0]], int((row >= 0).sum())) for row in grid]


@pytest.mark.parametrize("seed", range(30))
def test_audio_keep_is_contiguous_chunks(seed):
    g = _gen(100 + seed)
    time_steps, freq_bins = [(16, 4), (64, 8), (10, 3), (8, 2)][seed % 4]
    length = time_steps * freq_bins
    K = 1 + int(torch.randint(0, length, (1,), generator=g))
    imp = _importance(g, 3, length)
    keep = audio_keep(imp, torch.zeros(3, length, dtype=torch.bool), K, time_steps, freq_bins, 4, g)
    _assert_distinct_in_range(keep, length, K)
    for row in keep:
        chunks = _chunk_counts(row, time_steps, freq_bins, 4)
        partial = [i for i, (m, n) in enumerate(chunks) if 0 < int(m.sum()) < n]
        assert len(partial) <= 1
        for i in partial:
            m = chunks[i][0]
            kept = int(m.sum())
            prefix, suffix = bool(m[:kept].all()), bool(m[len(m) - kept :].all())
            assert prefix or suffix  # a contiguous run of time steps at one end of the chunk
            left_full = i > 0 and bool(chunks[i - 1][0].all())
            right_full = i + 1 < len(chunks) and bool(chunks[i + 1][0].all())
            if left_full and not right_full:
                assert prefix  # trimmed on its open (later-time) side
            if right_full and not left_full:
                assert suffix  # trimmed on its open (earlier-time) side


def test_audio_keep_avoids_excluded_tokens():
    g = _gen(7)
    time_steps, freq_bins, K = 64, 8, 256
    for _ in range(5):
        imp = _importance(g, 4, 512)
        excluded = torch.rand(4, 512, generator=g) < 0.3
        keep = audio_keep(imp, excluded, K, time_steps, freq_bins, 4, g)
        _assert_distinct_in_range(keep, 512, K)
        assert not excluded.gather(1, keep).any()


def test_audio_keep_falls_back_to_excluded_only_when_needed():
    g = _gen(8)
    excluded = torch.rand(2, 128, generator=g) < 0.8  # about 26 usable tokens < K
    keep = audio_keep(_importance(g, 2, 128), excluded, 64, 16, 8, 4, g)
    _assert_distinct_in_range(keep, 128, 64)
    for b in range(2):
        usable = set((~excluded[b]).nonzero().squeeze(1).tolist())
        assert usable <= set(keep[b].tolist())


def test_audio_chunks_follow_importance():
    imp = torch.full((1, 64), 1e-4)
    imp[0, 32:48] = 1.0  # chunk 2 (time steps 8..11, 4 freq bins) dominates
    imp = imp / imp.sum()
    hits = 0
    for seed in range(50):
        keep = audio_keep(imp, torch.zeros(1, 64, dtype=torch.bool), 16, 16, 4, 4, _gen(seed))
        hits += set(keep[0].tolist()) == set(range(32, 48))
    assert hits >= 48


def test_topk_and_random_keep():
    imp = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    assert set(topk_keep(imp, 2)[0].tolist()) == {1, 3}
    keep = random_keep(5, 30, 12, _gen(9))
    _assert_distinct_in_range(keep, 30, 12)
    assert not torch.equal(keep[0], keep[1])
    assert torch.equal(keep, random_keep(5, 30, 12, _gen(9)))


def _scores(
    g: torch.Generator, batch: int = 3, la: int = 32, lv: int = 48, heads: int = 2
) -> ClipScores:
    i_a, i_v = _importance(g, batch, la), _importance(g, batch, lv)
    return ClipScores(
        importance_a=i_a,
        importance_v=i_v,
        keys_a=torch.randn(batch, heads, la, 4, generator=g),
        keys_v=torch.randn(batch, heads, lv, 4, generator=g),
        proto_a=torch.randn(batch, heads, 4, generator=g),
        proto_v=torch.randn(batch, heads, 4, generator=g),
        cand_a=candidates(i_a, 0.5),
        cand_v=candidates(i_v, 0.5),
    )


def test_select_first_step_is_top_k():
    s = _scores(_gen(10))
    sel = select(s, None, None, (8, 4), SelectionConfig(), _gen(0))
    assert torch.equal(sel.keep_v, topk_keep(s.importance_v, 24))
    assert torch.equal(sel.keep_a, topk_keep(s.importance_a, 16))
    assert sel.C_v.abs().sum() == 0 and float(sel.frac_excluded) == 0


def test_select_uses_cross_modal_prototypes():
    g = _gen(11)
    s = _scores(g)
    past_a, past_v = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    sel = select(s, past_a, past_v, (8, 4), SelectionConfig(), _gen(1))
    torch.testing.assert_close(sel.C_v, correlation(s.keys_v, past_a, s.proto_a, s.cand_v))
    torch.testing.assert_close(sel.C_a, correlation(s.keys_a, past_v, s.proto_v, s.cand_a))
    assert (sel.C_v[~s.cand_v] == 0).all() and (sel.C_v[s.cand_v] > 0).all()
    _assert_distinct_in_range(sel.keep_v, 48, 24)
    _assert_distinct_in_range(sel.keep_a, 32, 16)
    assert torch.equal(sel.I_v, s.importance_v)
    assert 0 < float(sel.frac_excluded) < 0.5


def test_select_pairs_cyclically_with_fewer_replay_clips():
    g = _gen(12)
    s = _scores(g, batch=4)
    past_a, past_v = torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 4, generator=g)
    sel = select(s, past_a, past_v, (8, 4), SelectionConfig(), _gen(1))
    expected = correlation(s.keys_v, past_a[[0, 1, 0, 1]], s.proto_a, s.cand_v)
    torch.testing.assert_close(sel.C_v, expected)


def test_select_without_correlation_excludes_nothing():
    g = _gen(13)
    s = _scores(g)
    past = torch.randn(3, 2, 4, generator=g)
    sel = select(s, past, past, (8, 4), SelectionConfig(correlation=False), _gen(2))
    assert sel.C_a.abs().sum() == 0 and float(sel.frac_excluded) == 0


def test_select_replay_fresh_draws_and_exclusion():
    g = _gen(14)
    i_a, i_v = _importance(g, 2, 32), _importance(g, 2, 48)
    c_v = torch.zeros(2, 48)
    c_v[:, :20] = 1.0  # always excluded
    c_a = torch.zeros(2, 32)
    c_a[:, 8:12] = 1.0
    cfg = SelectionConfig()
    a = select_replay(c_a, c_v, i_a, i_v, (8, 4), cfg, _gen(0))
    b = select_replay(c_a, c_v, i_a, i_v, (8, 4), cfg, _gen(0))
    c = select_replay(c_a, c_v, i_a, i_v, (8, 4), cfg, _gen(1))
    assert torch.equal(a.keep_v, b.keep_v) and torch.equal(a.keep_a, b.keep_a)
    assert not torch.equal(a.keep_v, c.keep_v)
    assert (a.keep_v >= 20).all() and not ((a.keep_a >= 8) & (a.keep_a < 12)).any()
    torch.testing.assert_close(a.frac_excluded, torch.tensor((40 + 8) / (96 + 64)))


def test_gather_tokens():
    tokens = torch.arange(24.0).view(2, 4, 3)
    out = gather_tokens(tokens, torch.tensor([[3, 0], [1, 2]]))
    assert out.tolist() == [[[9, 10, 11], [0, 1, 2]], [[15, 16, 17], [18, 19, 20]]]
