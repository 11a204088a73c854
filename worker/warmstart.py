"""Start a cold stream from pretrained weights instead of from scratch.

The paper's continual run starts from a CAV-MAE backbone pretrained on AudioSet and an AVM
pretrained with that backbone frozen. ``FLAVA_INIT_WEIGHTS`` points the worker at such a
file when its checkpoint directory is empty. Accepted, all loaded with
``torch.load(weights_only=True)`` (tensors and plain containers only):

- our own checkpoints (``{"learner": {...}}``) or learner state dicts (``{"model": ...}``):
  backbone and AVM weights; optimizer, replay memory and counters start fresh. A file made
  by ``flava pretrain`` also carries its AVM's held-out matching accuracy
  (``avm_heldout_acc``): FLAVA's selection gate starts there, so selection is on from the
  first update when the pretrained AVM is above the gate;
- CAV-MAE or STELLA checkpoints (their key names; see worker/core/convert.py), with the
  STELLA authors' AVM (``module.avmatching_module.*``) when the learner has an AVM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.core.avm import map_author_keys
from worker.core.convert import load_cav_mae_state_dict
from worker.core.learner import Learner

log = logging.getLogger(__name__)
AUTHOR_AVM_PREFIXES = ("module.avmatching_module.", "avmatching_module.")


@dataclass(frozen=True)
class WarmStart:
    source: str  # "flava-stream", "cav-mae" or "stella"
    backbone_tensors: int  # backbone tensors loaded
    avm_tensors: int  # AVM tensors loaded (0 when the file or the learner has none)


def warm_start(learner: Learner, path: str | Path) -> WarmStart:
    """Load pretrained weights from ``path`` into ``learner`` (in place)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    ours = state.get("learner", state)
    if isinstance(ours.get("model"), dict) and "extra_modules" in ours:
        result = _load_ours(learner, ours)
    else:
        result = _load_theirs(learner, state)
    log.info("warm start from %s: %s", path, result)
    return result


def _load_ours(learner: Learner, state: dict[str, Any]) -> WarmStart:
    learner.model.load_state_dict(state["model"])
    extra = {k: v for k, v in state["extra_modules"].items() if k.startswith("avm.")}
    if extra and "avm" in learner.extra_modules:
        learner.extra_modules.load_state_dict(extra, strict=False)
    avm = len(extra) if "avm" in learner.extra_modules else 0
    if avm and "avm_heldout_acc" in state:  # written by `flava pretrain`
        learner.trust_alignment(float(state["avm_heldout_acc"]))
    return WarmStart("flava-stream", len(state["model"]), avm)


def _load_theirs(learner: Learner, state: dict[str, Any]) -> WarmStart:
    report = load_cav_mae_state_dict(learner.model, state)
    if report.unexpected:
        log.warning(
            "%d keys of the file were not used: %s", len(report.unexpected), report.unexpected[:5]
        )
    return WarmStart(report.source, len(report.loaded), _load_author_avm(learner, state))


def _load_author_avm(learner: Learner, state: dict[str, Any]) -> int:
    if "avm" not in learner.extra_modules:
        return 0
    raw = state["model"] if isinstance(state.get("model"), dict) else state
    for prefix in AUTHOR_AVM_PREFIXES:
        mapped = map_author_keys(raw, prefix)
        if mapped:
            learner.extra_modules["avm"].load_state_dict(mapped)
            return len(mapped)
    return 0
