"""Pretraining as the paper does it: the backbone first, then the AVM with the backbone frozen.

One implementation, two callers: ``flava pretrain`` (the service's builtin start, see
flava/pretrain.py) and the continual benchmark (bench/continual/), which pretrains every
seed on a distribution separate from its tasks.

1. backbone: ``steps`` updates of the plain masked-autoencoder + contrastive objective
   (``finetune``) on the pretraining clips, Adam at ``lr``;
2. AVM: ``avm_steps`` updates of the matching loss only (half true pairs, half deranged
   videos), the backbone frozen, Adam at ``avm_lr``. The AVM reads the code pass, which
   starts from the modality blocks' outputs of each clip (all tokens, no masking, no
   augmentation): with the backbone frozen these are computed once per clip
   (``CodeCache``) and each update runs only the fusion blocks on its pairs and the AVM,
   so thousands of AVM updates cost little.

Resumable: with ``resume`` set, the state is saved there every ``save_every`` updates
(atomically) and a later call with the same arguments continues where it stopped, on the
same batches (batch orders follow from ``seed``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from worker.core.avm import AVM, MatchingResult, matching_pairs
from worker.core.clipset import ClipSet, batch_order, chunks, to_batch
from worker.core.files import atomic_torch_save
from worker.core.learner import Batch, Learner, LearnerConfig, build_learner
from worker.core.model import AVMAE, preset

logger = logging.getLogger(__name__)

# (phase "backbone" | "avm", updates done, updates in the phase, latest figures)
Progress = Callable[[str, int, int, dict[str, float]], None]


@dataclass(frozen=True)
class PretrainConfig:
    """The pretraining budget. The defaults make the builtin start; the continual benchmark
    pins the shorter budget of its committed run (bench/continual/config.py)."""

    preset: str = "tiny"  # model preset
    # backbone updates (finetune objective). 3,000 of 16 clips on 2,048 scenes take the
    # held-out instance a->v R@1 to 11-17% (chance 1.6%); 800 of 8 left it at 2-5%
    # (docs/localized.md)
    steps: int = 3000
    # AVM-only updates on the frozen pretrained backbone (cheap: ``CodeCache``). On the
    # localized scenes the AVM must find the sounding object among distractors before it
    # can match. On the backbone above, held-out matching accuracy on pretraining scenes
    # 0.70 / 0.77 / 0.72 after 2k / 5k / 10k updates of 16 (unseen tasks: 0.74 / 0.72 /
    # 0.69); 5k, the best on the pretraining scenes (docs/localized.md).
    avm_steps: int = 5000
    batch: int = 16  # clips per backbone update (also the contrastive term's negatives + 1)
    avm_batch: int = 16  # clips per AVM update (half true pairs, half deranged)
    lr: float = 1e-4  # backbone Adam lr (paper)
    # Weight of the contrastive term in the backbone phase. Not the paper's 0.1: the paper
    # starts from an AudioSet-pretrained backbone, ours from scratch in a few thousand
    # updates, and at 0.1 the instance retrieval stayed at chance; at 1.0 it learns, and
    # the AVM on that backbone passes the gate on unseen tasks (docs/localized.md). The
    # stream's learners keep the paper's 0.1 (``ModelConfig.nce_weight``).
    nce_weight: float = 1.0
    # The authors train the AVM for many epochs at 1e-4; a few hundred steps at 1e-4 leave
    # it near chance (measured: held-out matching accuracy 0.56 after 250 steps on the
    # synthetic stream), so the short pretraining uses 1e-3 (0.83 after 300 steps there).
    avm_lr: float = 1e-3
    seed: int = 0  # model init, batch orders and matching pairs
    save_every: int = 50  # updates between resumable saves (with ``resume``)


@dataclass
class Pretrained:
    """Pretrained weights and what the pretraining measured."""

    model: dict[str, Tensor]  # backbone state dict
    avm: dict[str, Tensor]  # AVM state dict (keys without the "avm." prefix)
    log: dict[str, Any]  # curves, held-out AVM accuracy, seconds


def pretrain(
    train: ClipSet,
    held: ClipSet,
    cfg: PretrainConfig,
    *,
    progress: Progress | None = None,
    resume: Path | None = None,
) -> Pretrained:
    """Backbone, then AVM (backbone frozen) on ``train``; AVM accuracy measured on ``held``."""
    rng = np.random.default_rng([cfg.seed, 77])
    orders = (
        batch_order(len(train), cfg.steps, cfg.batch, rng),
        batch_order(len(train), cfg.avm_steps, cfg.avm_batch, rng),
    )
    run = _Run.start(cfg, resume)
    started = time.perf_counter()
    run.backbone_phase(train, orders[0], progress)
    run.avm_phase(train, orders[1], progress)
    run.log["heldout_avm_acc"] = avm_matching_accuracy(run.learner.model, run.avm, held)
    run.log["seconds"] = run.log.get("seconds", 0.0) + time.perf_counter() - started
    logger.info("pretrained: held-out AVM matching accuracy %.3f", run.log["heldout_avm_acc"])
    return Pretrained(run.learner.model.state_dict(), run.avm.state_dict(), run.log)


@dataclass
class _Run:
    """The state of one pretraining: a learner with an AVM, the AVM's optimizer, counters."""

    cfg: PretrainConfig
    learner: Learner  # "flava": backbone + AVM; the backbone phase uses its finetune twin
    backbone: Learner  # "finetune" learner whose updates make the backbone
    avm_opt: torch.optim.Optimizer
    done: dict[str, int]  # updates done per phase
    log: dict[str, Any]
    resume: Path | None

    @classmethod
    def start(cls, cfg: PretrainConfig, resume: Path | None) -> _Run:
        model_cfg = preset(cfg.preset)
        lcfg = LearnerConfig(lr=cfg.lr, avm_lr=cfg.avm_lr, seed=cfg.seed, memory_size=1)
        backbone_cfg = dataclasses.replace(model_cfg, nce_weight=cfg.nce_weight)
        backbone = build_learner("finetune", backbone_cfg, lcfg)
        learner = build_learner("flava", model_cfg, lcfg)
        avm = learner.extra_modules["avm"]
        opt = torch.optim.Adam(avm.parameters(), lr=cfg.avm_lr, betas=lcfg.betas)
        log: dict[str, Any] = {"backbone_loss": [], "avm_train_acc": []}
        run = cls(cfg, learner, backbone, opt, {"backbone": 0, "avm": 0}, log, resume)
        if resume is not None and resume.exists():
            run.load(torch.load(resume, map_location="cpu", weights_only=True))
        return run

    @property
    def avm(self) -> AVM:
        return self.learner.extra_modules["avm"]  # type: ignore[return-value]

    def backbone_phase(self, train: ClipSet, order: Tensor, progress: Progress | None) -> None:
        for i in range(self.done["backbone"], len(order)):
            stats = self.backbone.step(to_batch(train, order[i]))
            self.log["backbone_loss"].append(stats.loss)
            self._tick("backbone", i + 1, len(order), {"loss": stats.loss}, progress)
        self.learner.model.load_state_dict(self.backbone.model.state_dict())

    def avm_phase(self, train: ClipSet, order: Tensor, progress: Progress | None) -> None:
        if self.done["avm"] >= len(order):
            return
        self.learner.model.requires_grad_(False)
        codes = CodeCache.build(self.learner.model, train)
        gen = torch.Generator().manual_seed(self.cfg.seed + self.done["avm"])
        for i in range(self.done["avm"], len(order)):
            match = codes.match(self.learner.model, self.avm, order[i], gen)
            self.avm_opt.zero_grad(set_to_none=True)
            match.loss.backward()
            self.avm_opt.step()
            self.log["avm_train_acc"].append(float(match.acc))
            self._tick("avm", i + 1, len(order), {"acc": float(match.acc)}, progress)
        self.learner.model.requires_grad_(True)

    def _tick(
        self, phase: str, done: int, total: int, info: dict[str, float], progress: Progress | None
    ) -> None:
        self.done[phase] = done
        if progress is not None:
            progress(phase, done, total, info)
        if self.resume is not None and (done % self.cfg.save_every == 0 or done == total):
            atomic_torch_save(self.state_dict(), self.resume)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.cfg),
            "done": dict(self.done),
            "backbone": self.backbone.state_dict(),
            "model": self.learner.model.state_dict(),
            "avm": self.avm.state_dict(),
            "avm_opt": self.avm_opt.state_dict(),
            "log": self.log,
        }

    def load(self, state: dict[str, Any]) -> None:
        if state["config"] != dataclasses.asdict(self.cfg):
            raise ValueError(
                f"{self.resume}: saved by another pretraining config "
                f"({state['config']}); remove it or use that config"
            )
        self.done = {k: int(v) for k, v in state["done"].items()}
        self.backbone.load_state_dict(state["backbone"])
        self.learner.model.load_state_dict(state["model"])
        self.avm.load_state_dict(state["avm"])
        self.avm_opt.load_state_dict(state["avm_opt"])
        self.log = state["log"]
        logger.info("pretraining resumed from %s at %s", self.resume, self.done)


@torch.no_grad()
def modality_outputs(model: AVMAE, batch: Batch) -> tuple[Tensor, Tensor]:
    """The frozen backbone's modality blocks on all tokens: ha (B, La, D), hv (B, Lv, D),
    where the AVM's code pass starts."""
    return model.forward_modality(*model.tokenize(batch.fbank, batch.frames))


def match_codes(
    model: AVMAE, avm: nn.Module, ha: Tensor, hv: Tensor, generator: torch.Generator
) -> MatchingResult:
    """The AVM's matching loss on modality outputs ``ha``, ``hv`` of B clips (half true
    pairs, half deranged videos), the code pass under no_grad: only the AVM gets gradients."""
    with torch.no_grad():
        labels, video = matching_pairs(len(ha), generator)
        za, zv = model.forward_code(ha, hv[video])
    return avm.match(za, zv, labels)  # type: ignore[operator]


def avm_match(
    model: AVMAE, avm: nn.Module, batch: Batch, generator: torch.Generator
) -> MatchingResult:
    """The AVM's matching loss on ``batch``, the backbone's passes under no_grad."""
    return match_codes(model, avm, *modality_outputs(model, batch), generator)


@dataclass
class CodeCache:
    """Every clip's modality outputs, computed once on a frozen backbone.

    The AVM phase reads them instead of rerunning tokenizer and modality blocks each
    update; ``match`` gives the same result as ``avm_match`` on the same clips. 4 (La + Lv) D
    bytes per clip: 209 kB for ``tiny``, 107 MB for 512 clips.
    """

    ha: Tensor  # (N, La, D) audio modality outputs
    hv: Tensor  # (N, Lv, D) video modality outputs

    @classmethod
    def build(cls, model: AVMAE, clips: ClipSet, chunk: int = 32) -> CodeCache:
        parts = [modality_outputs(model, to_batch(clips, i)) for i in chunks(len(clips), chunk)]
        return cls(torch.cat([a for a, _ in parts]), torch.cat([v for _, v in parts]))

    def match(
        self, model: AVMAE, avm: nn.Module, idx: Tensor, generator: torch.Generator
    ) -> MatchingResult:
        """``avm_match`` on clips ``idx`` (B,) of the cached set."""
        return match_codes(model, avm, self.ha[idx], self.hv[idx], generator)


@torch.no_grad()
def avm_matching_accuracy(
    model: AVMAE, avm: nn.Module, clips: ClipSet, seed: int = 0, chunk: int = 32
) -> float:
    """Held-out matching accuracy (half true, half deranged pairs per chunk; chance 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    hits, total = 0.0, 0
    for idx in chunks(len(clips), chunk):
        if len(idx) < 3:  # no negatives in a batch under 3 clips
            continue
        match = avm_match(model, avm, to_batch(clips, idx), gen)
        hits += float(match.acc) * len(idx)
        total += len(idx)
    return hits / total if total else math.nan
