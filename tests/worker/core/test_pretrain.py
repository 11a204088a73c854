"""Pretraining: the cached AVM phase equals the uncached one; the backbone's contrastive weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.core.clipset import ClipSet, batch_order, to_batch
from worker.core.model import preset
from worker.core.pretrain import CodeCache, PretrainConfig, _Run, avm_match, pretrain

CFG = preset("tiny")


def clips(n: int, seed: int) -> ClipSet:
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(
        0, 256, (n, CFG.num_frames, 3, CFG.frame_size, CFG.frame_size), generator=gen
    )
    return ClipSet(
        fbank=torch.randn(n, CFG.audio_frames, CFG.mel_bins, generator=gen),
        frames=frames.to(torch.uint8),
        labels=torch.zeros(n, dtype=torch.int64),
        objects=torch.zeros(n, CFG.num_video_tokens, dtype=torch.bool),
    )


def test_cached_match_equals_uncached_match():
    run = _Run.start(PretrainConfig(), None)
    model, avm, data = run.learner.model, run.avm, clips(7, 0)
    codes = CodeCache.build(model, data, chunk=3)  # other batch boundaries than the batch's
    assert codes.ha.shape == (7, CFG.num_audio_tokens, CFG.dim)
    assert codes.hv.shape == (7, CFG.num_video_tokens, CFG.dim)
    idx = torch.tensor([5, 1, 6, 2, 0])
    cached = codes.match(model, avm, idx, torch.Generator().manual_seed(3))
    plain = avm_match(model, avm, to_batch(data, idx), torch.Generator().manual_seed(3))
    assert torch.equal(cached.labels, plain.labels) and 0 < plain.labels.sum() < len(idx)
    torch.testing.assert_close(cached.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.loss, plain.loss, atol=1e-6, rtol=1e-5)


def test_cached_avm_phase_equals_an_uncached_loop():
    """The pretraining's AVM (cached codes) = the AVM trained on fresh backbone passes."""
    cfg = PretrainConfig(steps=2, avm_steps=4, batch=4, avm_batch=4, seed=1)
    train = clips(8, 1)
    got = pretrain(train, clips(4, 2), cfg)

    rng = np.random.default_rng([cfg.seed, 77])
    orders = [batch_order(8, cfg.steps, cfg.batch, rng), batch_order(8, 4, 4, rng)]
    ref = _Run.start(cfg, None)
    ref.backbone_phase(train, orders[0], None)
    ref.learner.model.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    for idx in orders[1]:
        match = avm_match(ref.learner.model, ref.avm, to_batch(train, idx), gen)
        ref.avm_opt.zero_grad(set_to_none=True)
        match.loss.backward()
        ref.avm_opt.step()
    want = ref.avm.state_dict()
    assert any(
        not torch.equal(v, _Run.start(cfg, None).avm.state_dict()[k]) for k, v in want.items()
    )
    for key, value in want.items():
        torch.testing.assert_close(got.avm[key], value, atol=1e-5, rtol=1e-4, msg=key)
    for key, value in ref.learner.model.state_dict().items():
        assert torch.equal(got.model[key], value), key


def test_backbone_phase_uses_the_configured_contrastive_weight():
    run = _Run.start(PretrainConfig(nce_weight=0.7), None)
    assert run.backbone.model.cfg.nce_weight == 0.7
    assert run.learner.model.cfg.nce_weight == CFG.nce_weight  # the stream keeps the paper's
    stats = run.backbone.step(to_batch(clips(4, 3), torch.arange(4)))
    want = stats.loss_rec_a + stats.loss_rec_v + 0.7 * stats.loss_nce
    assert stats.loss == pytest.approx(want, rel=1e-5)
