"""Helpers shared by the continual-method tests (test_methods, test_replay, test_flava)."""

from __future__ import annotations

import torch

from worker.core.learner import Batch, Learner, LearnerConfig, build_learner
from worker.core.model import ModelConfig

SELECT_NOW = {"warmup_acc": 0.0}  # FLAVA's gate open from the first step (a pretrained AVM)


def make_batch(cfg: ModelConfig, n: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        fbank=torch.randn(n, cfg.audio_frames, cfg.mel_bins, generator=g),
        frames=torch.randn(n, cfg.num_frames, 3, cfg.frame_size, cfg.frame_size, generator=g),
        ids=[f"c{seed}-{i}" for i in range(n)],
    )


def learner_for(name: str, cfg: ModelConfig, seed: int = 0, **options: object) -> Learner:
    """A learner with an 8-clip memory; FLAVA variants select from the first step unless
    ``options`` say otherwise. ``LearnerConfig`` fields may be passed among ``options``."""
    fields = {k: options.pop(k) for k in list(options) if hasattr(LearnerConfig, k)}
    opts = {**SELECT_NOW, **options} if name.startswith("flava") else {}
    cfg_l = LearnerConfig(seed=seed, memory_size=8, options=opts, **fields)  # type: ignore[arg-type]
    return build_learner(name, cfg, cfg_l)


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
