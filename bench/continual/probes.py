"""What the benchmark measures about a learner on held-out sets: retrieval embeddings and
evaluation (metrics.py), and the AVM diagnostics (does it match, does it localise)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.continual.metrics import clip_aucs, label_retrieval, union_retrieval
from worker.core.avm import derangement
from worker.core.clipset import ClipSet, chunks, embed_clips, to_batch
from worker.core.learner import Learner
from worker.core.model import AVMAE
from worker.core.pretrain import avm_matching_accuracy


def evaluate(learner: Learner, sets: Sequence[ClipSet], chunk: int = 32) -> dict[str, Any]:
    """Retrieval on every task's held-out set.

    ``instance``: per set, its queries against the union of all sets (the headline);
    ``label``: per set, label-level hits inside its own gallery (secondary view);
    ``gallery``: the union gallery's size."""
    embs = [embed_clips(learner, clips, chunk) for clips in sets]
    a, v = torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs])
    bounds = np.cumsum([0] + [len(s) for s in sets])
    groups = [torch.arange(int(lo), int(hi)) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    return {
        "instance": union_retrieval(a, v, groups),
        "label": [
            label_retrieval(ea, ev, s.labels) for (ea, ev), s in zip(embs, sets, strict=True)
        ],
        "gallery": int(bounds[-1]),
    }


@torch.no_grad()
def localization(
    model: AVMAE, avm: nn.Module, clips: ClipSet, seed: int = 0, chunk: int = 32
) -> dict[str, float]:
    """Does the AVM's video importance I_v point at the sounding object?

    - ``auc``: per clip, ROC AUC of I_v ranking the sounding object's tokens above the
      distractors' (only those tokens; sets without distractor masks: above every other
      token), averaged over clips; 0.5 = chance;
    - ``auc_shuffled``: the same with each video paired with another clip's audio (the
      control: should be near 0.5);
    - ``object_recall``: share of the object's tokens among the candidates (top half by I_v).
    """
    gen = torch.Generator().manual_seed(seed)
    aucs, shuffled, recalls = [], [], []
    for idx in chunks(len(clips), chunk):
        b = to_batch(clips, idx)
        ha, hv = model.forward_modality(*model.tokenize(b.fbank, b.frames))
        obj = clips.objects[idx]
        neg = ~obj if clips.distractors is None else clips.distractors[idx]
        scores = avm.clip_scores(*model.forward_code(ha, hv))  # type: ignore[operator]
        aucs += clip_aucs(scores.importance_v, obj, neg)
        hit = (scores.cand_v & obj).sum(1) / obj.sum(1).clamp_min(1)
        recalls.append(hit[obj.any(1)])
        if len(idx) >= 2:
            other = derangement(len(idx), gen)
            mixed = avm.clip_scores(*model.forward_code(ha[other], hv))  # type: ignore[operator]
            shuffled += clip_aucs(mixed.importance_v, obj, neg)
    return {
        "auc": _mean(aucs),
        "auc_shuffled": _mean(shuffled),
        "object_recall": float(torch.cat(recalls).mean()) if recalls else math.nan,
    }


def avm_diagnostics(learner: Learner, clips: ClipSet, seed: int = 0) -> dict[str, float]:
    """Held-out AVM matching accuracy (chance 0.5) and the localization figures."""
    model, avm = learner.model, learner.extra_modules["avm"]
    acc = avm_matching_accuracy(model, avm, clips, seed=seed)
    return {"match_acc": acc, **localization(model, avm, clips, seed)}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan
