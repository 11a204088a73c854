import pytest
import torch
from torch import nn

from worker.core.avm import AVM, AVMConfig, derangement, map_author_keys, matching_pairs

CFG = AVMConfig(dim=16, heads=2, head_dim=8)


def _tokens(seed: int, batch: int = 4, la: int = 12, lv: int = 20) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, la, CFG.dim, generator=g), torch.randn(
        batch, lv, CFG.dim, generator=g
    )


def _avm(seed: int = 0, cfg: AVMConfig = CFG) -> AVM:
    torch.manual_seed(seed)
    return AVM(cfg)


def test_projection_and_logit_shapes():
    za, zv = _tokens(0)
    avm = _avm()
    proj = avm.project(za, zv)
    assert proj.a.q.shape == (4, 2, 12, 8) and proj.v.v.shape == (4, 2, 20, 8)
    lg = avm.logits(proj)
    assert lg.av.shape == (4, 2, 12, 20) and lg.va.shape == (4, 2, 20, 12)
    expected = proj.a.q[1, 0] @ proj.v.k[1, 0].T / 8**0.5
    torch.testing.assert_close(lg.av[1, 0], expected)
    assert avm.match_logit(proj.a, proj.v).shape == (4,)


def test_importance_sums_to_one_per_clip():
    for seed in range(5):
        za, zv = _tokens(seed, batch=3, la=7 + seed, lv=11)
        imp = _avm(seed).importance(_avm(seed).project(za, zv))
        assert imp.a.shape == (3, 7 + seed) and imp.v.shape == (3, 11)
        torch.testing.assert_close(imp.a.sum(-1), torch.ones(3))
        torch.testing.assert_close(imp.v.sum(-1), torch.ones(3))
        assert (imp.v > 0).all()


def test_importance_matches_loop_formula():
    za, zv = _tokens(1, batch=1, la=5, lv=6)
    avm = _avm()
    proj = avm.project(za, zv)
    imp = avm.importance(proj)
    expected = torch.zeros(6)
    for h in range(CFG.heads):
        for i in range(5):
            s = proj.a.q[0, h, i] @ proj.v.k[0, h].T / 8**0.5
            expected += torch.softmax(s / CFG.tau, dim=0)
    torch.testing.assert_close(imp.v[0], expected / (CFG.heads * 5))


def test_prototypes_weighted_mean_over_candidates():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]]])  # (1, 1, 3, 2)
    importance = torch.tensor([[0.6, 0.2, 0.2]])
    cand = torch.tensor([[True, True, False]])
    proto = AVM.prototypes(q, importance, cand)
    torch.testing.assert_close(proto, torch.tensor([[[0.75, 0.5]]]))


@pytest.mark.parametrize("n", range(2, 51))
def test_derangement_has_no_fixed_point(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        d = derangement(n, g)
        assert sorted(d.tolist()) == list(range(n))
        assert not (d == torch.arange(n)).any()


def test_derangement_rejects_too_small():
    with pytest.raises(ValueError):
        derangement(1)


def test_matching_pairs_half_true_half_deranged():
    g = torch.Generator().manual_seed(0)
    for batch in (3, 4, 9, 16):
        labels, video = matching_pairs(batch, g)
        pos = labels == 1
        assert int(pos.sum()) == batch // 2
        assert (video[pos] == torch.arange(batch)[pos]).all()
        assert (video[~pos] != torch.arange(batch)[~pos]).all()
        assert sorted(video.tolist()) == list(range(batch))
    labels, video = matching_pairs(2, g)
    assert labels.tolist() == [1.0, 1.0] and video.tolist() == [0, 1]


def test_matching_loss_gives_gradients_only_to_avm():
    torch.manual_seed(0)
    backbone = nn.Linear(CFG.dim, CFG.dim)
    avm = _avm()
    za, zv = _tokens(2, batch=6)
    ta, tv = backbone(za), backbone(zv)
    out = avm.matching_loss(ta.detach(), tv.detach(), torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and 0.0 <= float(out.acc) <= 1.0
    assert all(p.grad is None for p in backbone.parameters())
    for name, p in avm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # control: without detaching, the backbone would receive gradients
    avm.matching_loss(backbone(za), backbone(zv), torch.Generator().manual_seed(0)).loss.backward()
    assert backbone.weight.grad is not None


def test_matching_loss_repeats_with_seed():
    za, zv = _tokens(3, batch=8)
    avm = _avm()
    a = avm.matching_loss(za, zv, torch.Generator().manual_seed(5))
    b = avm.matching_loss(za, zv, torch.Generator().manual_seed(5))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.logits, b.logits)


def _aligned_batch(g: torch.Generator, batch: int = 16) -> tuple:
    """Clips whose audio and video share a clip signature in a few 'sounding' video patches."""
    sig = torch.randn(batch, 1, CFG.dim, generator=g) * 2
    za = torch.randn(batch, 8, CFG.dim, generator=g) * 0.5 + sig
    zv = torch.randn(batch, 16, CFG.dim, generator=g) * 0.5
    zv[:, :4] += sig  # only video patches 0..3 carry the sound's signature
    return za, zv


def test_importance_localizes_on_aligned_patches():
    avm = _avm()
    with torch.no_grad():  # queries and keys read the raw features: q.k = 4 * <x_a, x_v>
        for lin in (avm.to_a_q, avm.to_a_k, avm.to_v_q, avm.to_v_k):
            lin.weight.copy_(torch.eye(CFG.dim) * 2)
        za, zv = _aligned_batch(torch.Generator().manual_seed(0))
        imp = avm.importance(avm.project(za, zv))
        shuffled = avm.importance(avm.project(za, zv.roll(1, dims=0)))
    assert float(imp.v[:, :4].sum(-1).mean()) > 0.85  # 4 of 16 patches hold the mass
    assert float(shuffled.v[:, :4].sum(-1).mean()) < 0.6  # mismatched audio: no such focus


def test_matching_loss_trains_the_avm():
    avm = _avm()
    opt = torch.optim.Adam(avm.parameters(), lr=3e-3)
    za, zv = _aligned_batch(torch.Generator().manual_seed(1), batch=8)
    losses = []
    for _ in range(60):
        out = avm.matching_loss(za, zv, torch.Generator().manual_seed(0))  # same pairs each step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0] and float(out.acc) == 1.0


def test_clip_scores_candidates_and_prototypes():
    za, zv = _tokens(4, batch=2, la=10, lv=14)
    avm = _avm()
    with torch.no_grad():
        s = avm.clip_scores(za, zv)
    assert s.cand_a.sum(-1).tolist() == [5, 5] and s.cand_v.sum(-1).tolist() == [7, 7]
    assert s.proto_a.shape == (2, 2, 8) and s.keys_v.shape == (2, 2, 14, 8)
    assert s.importance_v[s.cand_v].min() >= s.importance_v[~s.cand_v].max()


def test_map_author_keys_loads_strict():
    avm = _avm()
    ours = avm.state_dict()
    renamed = {"matching_score.pooler.dense.": "head.0.", "matching_score.fc.": "head.2."}
    theirs = {}
    for key, value in ours.items():
        for new_prefix, old in ((v, k) for k, v in renamed.items()):
            key = old + key[len(new_prefix) :] if key.startswith(new_prefix) else key
        theirs["module.avmatching_module." + key] = value + 1.0
    assert any(k.endswith("matching_score.fc.weight") for k in theirs)
    fresh = _avm(seed=1)
    fresh.load_state_dict(map_author_keys(theirs, prefix="module.avmatching_module."))
    torch.testing.assert_close(fresh.head[2].weight, ours["head.2.weight"] + 1.0)
