"""CAV-MAE / STELLA checkpoint conversion (worker/core/convert.py) on the tiny preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.core.convert import load_cav_mae_state_dict, to_cav_mae_state_dict
from worker.core.model import AVMAE, ModelConfig, preset


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return preset("tiny")


@pytest.fixture(scope="module")
def fbank(cfg: ModelConfig) -> torch.Tensor:
    return torch.randn(
        3, cfg.audio_frames, cfg.mel_bins, generator=torch.Generator().manual_seed(1)
    )


def _perturbed(cfg: ModelConfig, seed: int) -> AVMAE:
    torch.manual_seed(seed)
    model = AVMAE(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_cav_mae_key_map_round_trip(cfg: ModelConfig) -> None:
    src, dst = _perturbed(cfg, 1), _perturbed(cfg, 2)
    theirs = to_cav_mae_state_dict(src)
    assert theirs["patch_embed_a.proj.weight"].shape == (cfg.dim, 1, 16, 16)
    assert theirs["pos_embed_v"].shape == (1, cfg.video_grid**2, cfg.dim)
    assert "mask_token" in theirs and "inter_pos_embed_a" not in theirs
    report = load_cav_mae_state_dict(dst, {"model": theirs})
    assert report.source == "cav-mae" and report.unexpected == [] and report.missing == []
    lossy = {
        "pos_embed_v",
        "decoder_pos_embed_v",
        "mask_token_v",
        "inter_pos_embed_a",
        "inter_pos_embed_v",
    }
    got, want = dst.state_dict(), src.state_dict()
    assert [k for k in want if k not in lossy and not torch.equal(got[k], want[k])] == []
    frame0 = want["pos_embed_v"][:, : cfg.video_grid**2]
    assert torch.equal(got["pos_embed_v"], frame0.repeat(1, cfg.num_frames, 1))
    assert torch.equal(got["mask_token_v"], want["mask_token_a"])
    assert not got["inter_pos_embed_v"].any()


def test_cav_mae_layout_is_the_transposed_spectrogram(cfg: ModelConfig, fbank) -> None:
    """CAV-MAE's conv on the (freq x time) map gives our tokens in freq-major order."""
    model = _perturbed(cfg, 3)
    theirs = to_cav_mae_state_dict(model)
    spec = fbank.unsqueeze(1).transpose(2, 3)  # (B, 1, F, T), as CAV-MAE feeds it
    w, b = theirs["patch_embed_a.proj.weight"], theirs["patch_embed_a.proj.bias"]
    cav = F.conv2d(spec, w, b, stride=16).flatten(2).transpose(1, 2) + theirs["pos_embed_a"]
    ours = model.patch_embed_a(model.patchify_audio(fbank)) + model.pos_embed_a
    t_tokens, f_tokens = cfg.audio_grid
    t, f = 9, 5
    torch.testing.assert_close(cav[:, f * t_tokens + t], ours[:, t * f_tokens + f])
    # their decoder predicts pixels (freq, time) of a patch; ours (time, freq)
    h = torch.randn(2, cfg.dec_dim)
    cav_pred = F.linear(h, theirs["decoder_pred_a.weight"], theirs["decoder_pred_a.bias"])
    our_pred = model.decoder_pred_a(h)
    torch.testing.assert_close(
        cav_pred.reshape(2, 16, 16).transpose(1, 2), our_pred.reshape(2, 16, 16)
    )


def test_stella_checkpoint_loads_exactly(cfg: ModelConfig) -> None:
    src, dst = _perturbed(cfg, 4), _perturbed(cfg, 5)
    renames = {
        "decoder_pred_a.": "mae_score_audio.decoder.",
        "decoder_pred_v.": "mae_score_video.decoder.",
    }
    theirs = {}
    for key, value in src.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        theirs["module.backbone.transformer." + key] = value.clone()
    p = cfg.patch
    w = theirs["module.backbone.transformer.patch_embed_v.proj.weight"]
    theirs["module.backbone.transformer.patch_embed_v.proj.weight"] = w.reshape(
        -1, p, p, 3
    ).permute(0, 3, 1, 2)
    theirs["module.backbone.transformer.vacls_classifier.fc1.weight"] = torch.zeros(2, 2)
    report = load_cav_mae_state_dict(dst, {"model": theirs})
    assert report.source == "stella" and report.missing == []
    assert report.unexpected == ["vacls_classifier.fc1.weight"]
    got = dst.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.state_dict().items())


def test_mismatched_depths_are_reported_not_loaded(cfg: ModelConfig) -> None:
    deeper = AVMAE(preset("tiny", modality_layers=3))
    model = AVMAE(cfg)
    report = load_cav_mae_state_dict(model, to_cav_mae_state_dict(deeper))
    assert "blocks_a.2.attn.qkv.weight" in report.unexpected
    assert report.missing == []
