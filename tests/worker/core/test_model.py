"""AVMAE on the tiny preset: shapes, losses, gradients, positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.core.model import (
    AVMAE,
    ModelConfig,
    contrastive_loss,
    gather,
    preset,
    random_split,
    split_selected,
)

B = 3


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return preset("tiny")


@pytest.fixture(scope="module")
def model(cfg: ModelConfig) -> AVMAE:
    torch.manual_seed(0)
    return AVMAE(cfg).eval()


@pytest.fixture(scope="module")
def inputs(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    fbank = torch.randn(B, cfg.audio_frames, cfg.mel_bins, generator=g)
    frames = torch.randn(B, cfg.num_frames, 3, cfg.frame_size, cfg.frame_size, generator=g)
    return fbank, frames


def splits(cfg: ModelConfig, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    la, lv = cfg.num_audio_tokens, cfg.num_video_tokens
    vis_a, tgt_a = random_split(B, la, cfg.n_visible(la), g)
    vis_v, tgt_v = random_split(B, lv, cfg.n_visible(lv), g)
    return vis_a, tgt_a, vis_v, tgt_v


# -- config -------------------------------------------------------------------------------


def test_token_counts_of_presets() -> None:
    base, tiny = preset("base"), preset("tiny")
    assert (base.num_audio_tokens, base.num_video_tokens) == (512, 784)
    assert (base.n_visible(512), base.n_visible(784)) == (102, 156)
    assert (tiny.num_audio_tokens, tiny.num_video_tokens) == (128, 144)
    assert preset("tiny", dim=96).dim == 96


def test_bad_presets_and_configs_raise() -> None:
    with pytest.raises(ValueError, match="tiny"):
        preset("huge")
    with pytest.raises(ValueError, match="audio_frames"):
        ModelConfig(audio_frames=1000)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=100)


def test_media_config_produces_the_model_inputs(cfg: ModelConfig) -> None:
    media = cfg.media()
    got = (media.audio_frames, media.mel_bins, media.num_frames, media.frame_size)
    assert got == (cfg.audio_frames, cfg.mel_bins, cfg.num_frames, cfg.frame_size)


def test_wrong_input_shape_raises(model: AVMAE, inputs) -> None:
    fbank, frames = inputs
    with pytest.raises(ValueError, match="expected fbank"):
        model.embed(fbank[:, :-16], frames)


# -- patches ------------------------------------------------------------------------------


def test_audio_patches_are_time_major(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    fbank = inputs[0]
    patches = model.patchify_audio(fbank)
    f_tokens = cfg.audio_grid[1]
    t, f, i, j = 5, 3, 7, 11  # token (t, f), pixel (time i, freq j) inside it
    assert patches.shape == (B, cfg.num_audio_tokens, 256)
    assert patches[1, t * f_tokens + f, i * 16 + j] == fbank[1, t * 16 + i, f * 16 + j]
    assert torch.equal(model.unpatchify_audio(patches), fbank)


def test_video_patches_are_frame_row_col(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    frames = inputs[1]
    patches = model.patchify_video(frames)
    g = cfg.video_grid
    t, r, c, i, j, ch = 2, 4, 1, 3, 9, 2
    assert patches.shape == (B, cfg.num_video_tokens, 768)
    want = frames[0, t, ch, r * 16 + i, c * 16 + j]
    assert patches[0, t * g * g + r * g + c, (i * 16 + j) * 3 + ch] == want
    assert torch.equal(model.unpatchify_video(patches), frames)


# -- stages -------------------------------------------------------------------------------


def test_stage_shapes(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    fbank, frames = inputs
    d, la, lv = cfg.dim, cfg.num_audio_tokens, cfg.num_video_tokens
    vis_a, tgt_a, vis_v, tgt_v = splits(cfg)
    xa, xv = model.tokenize(fbank, frames)
    assert (xa.shape, xv.shape) == ((B, la, d), (B, lv, d))
    ha, hv = model.forward_modality(gather(xa, vis_a), gather(xv, vis_v), vis_a, vis_v)
    assert (ha.shape, hv.shape) == ((B, vis_a.shape[1], d), (B, vis_v.shape[1], d))
    ja, jv = model.forward_joint(ha, hv)
    assert (ja.shape, jv.shape) == (ha.shape, hv.shape)
    assert model.forward_unimodal(hv, "v").shape == hv.shape
    za, zv = model.forward_code(*model.forward_modality(xa, xv))
    assert (za.shape, zv.shape) == ((B, la, d), (B, lv, d))
    enc = model.forward_encoder(fbank, frames, vis_a, vis_v)
    assert enc.joint_a.shape == ja.shape and enc.pooled_v.shape == (B, d)
    pred = model.forward_decoder(enc.joint_v, vis_v, tgt_v, "v")
    assert pred.shape == (B, tgt_v.shape[1], 768)
    assert model.forward_decoder(enc.joint_a, vis_a, tgt_a, "a").shape[-1] == 256
    emb_a, emb_v = model.embed(fbank, frames)
    assert (emb_a.shape, emb_v.shape) == ((B, d), (B, d))


def test_mae_loss_is_finite_and_combines_its_terms(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    out = model.mae_loss(*inputs, *splits(cfg))
    assert torch.isfinite(out.loss)
    want = out.loss_rec_a + out.loss_rec_v + cfg.nce_weight * out.loss_nce
    torch.testing.assert_close(out.loss, want)
    assert out.pooled_a.shape == (B, cfg.dim)


def test_every_parameter_gets_a_gradient(cfg: ModelConfig, inputs) -> None:
    """The code pass uses no parameter of its own, so mae_loss reaches every one."""
    torch.manual_seed(0)
    model = AVMAE(cfg)
    model.mae_loss(*inputs, *splits(cfg)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_decoder_sequence_is_visible_plus_targets(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    """FLAVA's saving: tokens outside vis and tgt never enter the decoder."""
    seen: list[int] = []
    hook = model.decoder_blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    vis_a, tgt_a, vis_v, tgt_v = splits(cfg)
    try:
        model.mae_loss(*inputs, vis_a, tgt_a[:, :40], vis_v, tgt_v[:, :17])
    finally:
        hook.remove()
    assert seen == [vis_a.shape[1] + 40, vis_v.shape[1] + 17]


def test_code_pass_is_the_joint_pass_before_its_final_norm(model: AVMAE, inputs) -> None:
    """STELLA feeds the AVM the joint fusion output of all tokens, un-normalised."""
    with torch.no_grad():
        ha, hv = model.forward_modality(*model.tokenize(*inputs))
        za, zv = model.forward_code(ha, hv)
        ja, jv = model.forward_joint(ha, hv)
    torch.testing.assert_close(model.norm(za), ja)
    torch.testing.assert_close(model.norm(zv), jv)
    assert not torch.allclose(za, ja, atol=1e-2)


def test_embed_equals_embed_from_hidden(model: AVMAE, inputs) -> None:
    with torch.no_grad():
        direct = model.embed(*inputs)
        hidden = model.forward_modality(*model.tokenize(*inputs))
        via_hidden = model.embed_from_hidden(*hidden)
    torch.testing.assert_close(direct, via_hidden, rtol=0, atol=0)


def test_forward_is_mae_loss(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    idx = splits(cfg)
    torch.testing.assert_close(model(*inputs, *idx).loss, model.mae_loss(*inputs, *idx).loss)


# -- positions ----------------------------------------------------------------------------


def test_tokenize_commutes_with_gather(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    """Embedding is per token: embedding a subset equals gathering from all tokens."""
    vis_a, _, vis_v, _ = splits(cfg)
    xa, xv = model.tokenize(*inputs)
    pa = gather(model.patchify_audio(inputs[0]), vis_a)
    pv = gather(model.patchify_video(inputs[1]), vis_v)
    sa, sv = model.tokenize_patches(pa, vis_a, pv, vis_v)
    torch.testing.assert_close(sa, gather(xa, vis_a))
    torch.testing.assert_close(sv, gather(xv, vis_v))


def test_blocks_are_equivariant_to_token_order(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    """Tokens carry their positions, so reordering a subset only reorders the outputs."""
    vis_a, _, vis_v, _ = splits(cfg)
    perm_a, perm_v = torch.randperm(vis_a.shape[1]), torch.randperm(vis_v.shape[1])
    xa, xv = model.tokenize(*inputs)
    with torch.no_grad():
        ha, hv = model.forward_modality(gather(xa, vis_a), gather(xv, vis_v), vis_a, vis_v)
        pa, pv = vis_a[:, perm_a], vis_v[:, perm_v]
        qa, qv = model.forward_modality(gather(xa, pa), gather(xv, pv), pa, pv)
    torch.testing.assert_close(qa, ha[:, perm_a], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qv, hv[:, perm_v], atol=1e-5, rtol=1e-5)


def test_loss_ignores_order_within_index_sets(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    vis_a, tgt_a, vis_v, tgt_v = splits(cfg)
    shuffle = lambda x: x[:, torch.randperm(x.shape[1])]  # noqa: E731
    with torch.no_grad():
        ref = model.mae_loss(*inputs, vis_a, tgt_a, vis_v, tgt_v)
        out = model.mae_loss(*inputs, shuffle(vis_a), shuffle(tgt_a), shuffle(vis_v), tgt_v)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_positions_change_the_output(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    """The same token contents placed at other positions give other outputs."""
    vis_a, _, vis_v, _ = splits(cfg)
    xa, xv = model.tokenize(*inputs)
    moved_a = (vis_a + 1) % cfg.num_audio_tokens
    with torch.no_grad():
        ha, _ = model.forward_modality(gather(xa, vis_a), gather(xv, vis_v), vis_a, vis_v)
        ma, _ = model.forward_modality(gather(xa, vis_a), gather(xv, vis_v), moved_a, vis_v)
    assert not torch.allclose(ha, ma, atol=1e-3)


def test_loss_never_reads_unselected_pixels(model: AVMAE, cfg: ModelConfig, inputs) -> None:
    """A clip stored as its selected patches only can be rebuilt with zeros elsewhere."""
    fbank, frames = inputs
    vis_a, tgt_a, vis_v, tgt_v = splits(cfg)
    tgt_a, tgt_v = tgt_a[:, :30], tgt_v[:, :30]
    keep_a = torch.zeros(B, cfg.num_audio_tokens, 1).scatter_(
        1, torch.cat([vis_a, tgt_a], 1)[..., None], 1
    )
    keep_v = torch.zeros(B, cfg.num_video_tokens, 1).scatter_(
        1, torch.cat([vis_v, tgt_v], 1)[..., None], 1
    )
    zeroed_a = model.unpatchify_audio(model.patchify_audio(fbank) * keep_a)
    zeroed_v = model.unpatchify_video(model.patchify_video(frames) * keep_v)
    with torch.no_grad():
        ref = model.mae_loss(fbank, frames, vis_a, tgt_a, vis_v, tgt_v)
        out = model.mae_loss(zeroed_a, zeroed_v, vis_a, tgt_a, vis_v, tgt_v)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)


# -- losses -------------------------------------------------------------------------------


def test_reconstruction_loss_normalises_each_patch(model: AVMAE) -> None:
    target = torch.randn(2, 10, 256)
    idx = torch.tensor([[1, 4, 7], [0, 2, 9]])
    picked = gather(target, idx)
    normed = (picked - picked.mean(-1, keepdim=True)) / (picked.var(-1, keepdim=True) + 1e-6).sqrt()
    assert model.reconstruction_loss(normed, target, idx) < 1e-6
    # an affine change of every patch leaves the normalised target unchanged
    zero = torch.zeros_like(normed)
    ref = model.reconstruction_loss(zero, target, idx)
    torch.testing.assert_close(model.reconstruction_loss(zero, 3 * target + 1, idx), ref)
    torch.testing.assert_close(ref, torch.tensor(1.0 - 1 / 256), atol=1e-3, rtol=0)


def test_contrastive_loss_matches_formula_and_rewards_alignment() -> None:
    a, v = torch.randn(6, 16), torch.randn(6, 16)
    an, vn = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
    logits = an @ vn.t() / 0.05
    labels = torch.arange(6)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(contrastive_loss(a, v, 0.05), want)
    aligned = contrastive_loss(torch.eye(6, 16), 2 * torch.eye(6, 16), 0.05)
    assert aligned < 1e-6 < contrastive_loss(torch.eye(6, 16), torch.eye(6, 16).roll(1, 0), 0.05)


# -- masking helpers ----------------------------------------------------------------------


def test_random_split_is_a_seeded_partition() -> None:
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    vis, tgt = random_split(4, 50, 10, g1)
    assert vis.shape == (4, 10) and tgt.shape == (4, 40) and vis.dtype == torch.int64
    assert torch.equal(torch.cat([vis, tgt], 1).sort(1).values, torch.arange(50).expand(4, -1))
    again = random_split(4, 50, 10, g2)
    assert torch.equal(vis, again[0]) and torch.equal(tgt, again[1])
    assert not torch.equal(vis[0], vis[1])


def test_split_selected_stays_inside_the_selection() -> None:
    selected = torch.stack([torch.randperm(100)[:30] for _ in range(4)])
    vis, tgt = split_selected(selected, 8, torch.Generator().manual_seed(0))
    assert vis.shape == (4, 8) and tgt.shape == (4, 22)
    both = torch.cat([vis, tgt], 1).sort(1).values
    assert torch.equal(both, selected.sort(1).values)
    with pytest.raises(ValueError, match="n_visible"):
        split_selected(selected, 31)
