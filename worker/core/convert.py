"""CAV-MAE and STELLA checkpoints to and from our ``AVMAE`` (names and tensor layouts).

``load_cav_mae_state_dict`` loads their weights into our model and reports what it did;
``to_cav_mae_state_dict`` is the inverse map (for tests and export). Layout differences are
in ``_Layout``; see docs/architecture.md for our token conventions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from worker.core.model import AVMAE, ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What ``load_cav_mae_state_dict`` did; ``source`` is "cav-mae" or "stella"."""

    source: str
    loaded: list[str] = field(default_factory=list)  # our keys that got a value
    missing: list[str] = field(default_factory=list)  # our keys left as they were
    unexpected: list[str] = field(default_factory=list)  # their keys we could not use
    reshaped: list[str] = field(default_factory=list)  # our keys filled after a layout change
    ignored: list[str] = field(default_factory=list)  # their keys that are unused by design


# CAV-MAE gives every block per-modality LNs; only the fusion blocks use them.
_UNUSED = re.compile(r"blocks_[av]\.\d+\.norm[12]_[av]\.(weight|bias)")


_STELLA_RENAMES = {
    "mae_score_audio.decoder.": "decoder_pred_a.",
    "mae_score_video.decoder.": "decoder_pred_v.",
}
_PREFIXES = ("module.backbone.transformer.", "backbone.transformer.", "transformer.", "module.")


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _detect_source(keys: list[str]) -> str:
    stella = ("inter_pos_embed_a", "inter_pos_embed_v", "mask_token_a", "mask_token_v")
    return "stella" if any(k in stella or k.startswith("mae_score_") for k in keys) else "cav-mae"


def _rename(key: str) -> str:
    for old, new in _STELLA_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


class _Layout:
    """Converts tensors between CAV-MAE's layouts and ours (for one ModelConfig).

    CAV-MAE feeds the fbank transposed, so its audio tokens are freq-major
    (index = f * T' + t) and its patch pixels are (freq, time); it is single-frame, so
    video position tables cover one frame; it has one mask token and no second
    positional embedding. STELLA already uses our layouts.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        t, f = cfg.audio_grid
        p = cfg.patch
        # ours[t * F' + f] = theirs[f * T' + t]
        self.token_perm = torch.arange(t * f).reshape(f, t).t().reshape(-1)
        # ours[pt * p + pf] = theirs[pf * p + pt]
        self.pixel_perm = torch.arange(p * p).reshape(p, p).t().reshape(-1)

    def patch_weight(self, w: Tensor, channels: int, cav: bool) -> Tensor:
        """Conv2d (D, C, p, p) -> Linear (D, p*p*C) in our pixel order (row, col, C)."""
        if w.dim() == 2:
            return w
        if cav and channels == 1:
            w = w.transpose(-1, -2)  # CAV-MAE's audio kernel is (freq, time)
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)

    def audio_tokens(self, x: Tensor) -> Tensor:
        return x[:, self.token_perm]

    def audio_pixels(self, x: Tensor) -> Tensor:
        return x[self.pixel_perm]


def _convert(key: str, value: Tensor, layout: _Layout, cav: bool, our_shape: torch.Size) -> Tensor:
    """One of their tensors in our layout (``key`` already renamed to ours)."""
    if key == "patch_embed_a.proj.weight":
        return layout.patch_weight(value, 1, cav)
    if key == "patch_embed_v.proj.weight":
        return layout.patch_weight(value, 3, cav)
    if cav and key in ("pos_embed_a", "decoder_pos_embed_a"):
        return layout.audio_tokens(value)
    if key in ("pos_embed_v", "decoder_pos_embed_v") and our_shape[1] % value.shape[1] == 0:
        return value.repeat(1, our_shape[1] // value.shape[1], 1)  # one frame -> every frame
    if cav and key.startswith("decoder_pred_a."):
        return layout.audio_pixels(value)
    return value


def _expand_cav(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """CAV-MAE's single mask token serves both modalities; it has no second pos table."""
    out = dict(sd)
    if "mask_token" in out:
        token = out.pop("mask_token")
        out.setdefault("mask_token_a", token)
        out.setdefault("mask_token_v", token)
    return out


@torch.no_grad()
def load_cav_mae_state_dict(model: AVMAE, state_dict: Mapping[str, Any]) -> LoadReport:
    """Load a CAV-MAE or STELLA checkpoint's weights into ``model`` (in place).

    Accepts a raw state dict, ``{"model": ...}``, or DDP/STELLA-prefixed keys. Keys
    whose shape cannot be matched (other depths or sizes) are reported, not loaded.
    For CAV-MAE (which has no second positional embedding) ``inter_pos_embed_*`` are
    zeroed so the loaded model computes what CAV-MAE computes; see the report.
    """
    raw = state_dict["model"] if isinstance(state_dict.get("model"), Mapping) else state_dict
    theirs = {_rename(_strip_prefix(k)): v for k, v in raw.items() if isinstance(v, Tensor)}
    source = _detect_source(list(theirs))
    cav = source == "cav-mae"
    if cav:
        theirs = _expand_cav(theirs)
    report = LoadReport(source)
    ours = model.state_dict()
    _copy_matching(ours, theirs, _Layout(model.cfg), cav, report)
    if cav:
        _zero_inter_pos(model, report)
    report.missing = sorted(set(ours) - set(report.loaded))
    logger.info(
        "loaded %d tensors from a %s checkpoint (%d missing, %d unexpected)",
        len(report.loaded),
        source,
        len(report.missing),
        len(report.unexpected),
    )
    return report


def _copy_matching(
    ours: dict[str, Tensor],
    theirs: dict[str, Tensor],
    layout: _Layout,
    cav: bool,
    report: LoadReport,
) -> None:
    for key, value in theirs.items():
        if key not in ours:
            unused = _UNUSED.fullmatch(key) is not None
            (report.ignored if unused else report.unexpected).append(key)
            continue
        converted = _convert(key, value, layout, cav, ours[key].shape)
        if converted.shape != ours[key].shape:
            report.unexpected.append(key)
            continue
        ours[key].copy_(converted)
        report.loaded.append(key)
        if converted.shape != value.shape or converted is not value:
            report.reshaped.append(key)


def _zero_inter_pos(model: AVMAE, report: LoadReport) -> None:
    for name in ("inter_pos_embed_a", "inter_pos_embed_v"):
        getattr(model, name).zero_()
        report.loaded.append(name)
        report.reshaped.append(name)


def to_cav_mae_state_dict(model: AVMAE) -> dict[str, Tensor]:
    """Our weights under CAV-MAE's names and layouts (the inverse map, for tests/export).

    Lossy where CAV-MAE has less: video position tables keep frame 0, the mask token is
    audio's, and the second positional embedding is dropped.
    """
    cfg = model.cfg
    t, f = cfg.audio_grid
    p = cfg.patch
    inv_tokens = torch.arange(t * f).reshape(t, f).t().reshape(-1)  # theirs <- ours
    per_frame = cfg.video_grid**2
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if re.fullmatch(r"inter_pos_embed_[av]|mask_token_v", key):
            continue
        value = value.clone()
        if key == "patch_embed_a.proj.weight":
            value = value.reshape(-1, p, p, 1).permute(0, 3, 2, 1)  # (D, 1, freq, time)
        elif key == "patch_embed_v.proj.weight":
            value = value.reshape(-1, p, p, 3).permute(0, 3, 1, 2)  # (D, 3, row, col)
        elif key in ("pos_embed_a", "decoder_pos_embed_a"):
            value = value[:, inv_tokens]
        elif key in ("pos_embed_v", "decoder_pos_embed_v"):
            value = value[:, :per_frame]
        elif key.startswith("decoder_pred_a."):
            value = value[torch.arange(p * p).reshape(p, p).t().reshape(-1)]
        out["mask_token" if key == "mask_token_a" else key] = value
    return out
