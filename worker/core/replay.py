"""Replay baselines behind the ``Learner`` seam (docs/design.md section 5): ER, DER++, LUMP.

Registered names:

- ``er``     Experience replay: current + replayed clips in one masked-autoencoder batch.
- ``derpp``  ER + der_alpha * MSE between replayed clips' stored pooled embeddings and now.
- ``lump``   Mixup of current and replayed clips, one lambda ~ Beta(0.5, 0.5) per step.

Every replay method samples ``replay_batch`` clips (default: the current batch size) from a
reservoir memory kept on the CPU, adds the current clips after the update, and adds nothing
when the step was skipped for a non-finite loss (a broken clip must not be replayed forever).
``ReplayLearner``, ``der_term`` and ``stored_embeddings`` are shared with FLAVA
(worker/core/flava.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from worker.core.learner import Batch, Learner, LearnerConfig, StepStats, register
from worker.core.memory import ReplayBatch, ReplayMemory
from worker.core.model import MAEOutput, ModelConfig


class ReplayLearner(Learner):
    """A learner with a reservoir replay memory (kept on the CPU, as the authors do)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: LearnerConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(model_cfg, cfg, device)
        memory_gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        self.memory = ReplayMemory(self.cfg.memory_size, memory_gen)

    def extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def replay_memory(self) -> ReplayMemory:
        return self.memory

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])

    def sample_replay(self, batch: int) -> ReplayBatch | None:
        """Replayed clips for a step (items on the learner's device), None if memory is empty."""
        if len(self.memory) == 0:
            return None
        sample = self.memory.sample(self.cfg.replay_batch or batch, self.generator)
        items = {k: v.to(self.device, non_blocking=True) for k, v in sample.items.items()}
        return ReplayBatch(items=items, slots=sample.slots)

    def remember(self, items: dict[str, Tensor], skipped: bool) -> None:
        """Offer the current clips to the memory unless the step was skipped."""
        if not skipped:
            self.memory.add(items)

    def replay_stats(self, stats: StepStats, batch: int, replay: ReplayBatch | None) -> StepStats:
        return dataclasses.replace(
            stats,
            batch_size=batch,
            replay_size=0 if replay is None else replay.slots.numel(),
            memory_fill=len(self.memory),
            memory_bytes=self.memory.nbytes(),
        )

    def mae_step(self, fbank: Tensor, frames: Tensor) -> MAEOutput:
        """Plain masked-autoencoder loss over all tokens of a (joined) batch."""
        idx = self.random_indices(fbank.shape[0])
        self.model.train()
        with self.autocast():
            return self.model.mae_loss(fbank, frames, *idx)


def joined(batch: Batch, replay: ReplayBatch | None) -> tuple[Tensor, Tensor]:
    """Current clips followed by the replayed ones: fbank (B+R, ...), frames (B+R, ...)."""
    if replay is None:
        return batch.fbank, batch.frames
    fbank = torch.cat([batch.fbank, replay.items["fbank"].to(batch.fbank.dtype)])
    return fbank, torch.cat([batch.frames, replay.items["frames"].to(batch.frames.dtype)])


def pair_index(batch: int, replay: int, device: torch.device) -> Tensor:
    """Replay partner of current clip n: n, cycled when fewer replayed clips, (B,) int64."""
    return torch.arange(batch, device=device) % replay


def der_term(out: MAEOutput, replay: ReplayBatch, batch: int) -> Tensor:
    """MSE(stored, current) pooled embeddings of the replayed clips, audio + video.

    ``out`` is the loss of a joined batch: the first ``batch`` rows are the current clips."""
    stored_a, stored_v = replay.items["emb_a"], replay.items["emb_v"]
    loss_a = F.mse_loss(out.pooled_a[batch:].float(), stored_a.float())
    return loss_a + F.mse_loss(out.pooled_v[batch:].float(), stored_v.float())


def stored_embeddings(out: MAEOutput, batch: int) -> dict[str, Tensor]:
    """The current clips' pooled embeddings as stored for distillation (float32)."""
    return {
        "emb_a": out.pooled_a[:batch].detach().float(),
        "emb_v": out.pooled_v[:batch].detach().float(),
    }


@register("er")
class ExperienceReplay(ReplayLearner):
    """ER: one masked-autoencoder batch of current + replayed whole clips."""

    distill = False  # DER++: also der_alpha * MSE on the replayed clips' stored embeddings

    def step(self, batch: Batch) -> StepStats:
        start = time.perf_counter()
        batch = batch.to(self.device)
        replay = self.sample_replay(len(batch))
        out = self.mae_step(*joined(batch, replay))
        der = out.loss.new_zeros(())
        if self.distill and replay is not None:
            der = der_term(out, replay, len(batch))
        total = out.loss + self.cfg.der_alpha * der
        skipped, norm = self._apply(total)
        items = {"fbank": batch.fbank, "frames": batch.frames}
        if self.distill:
            items |= stored_embeddings(out, len(batch))
        self.remember(items, skipped)
        stats = self.replay_stats(self.mae_stats(out, start, skipped, norm), len(batch), replay)
        elapsed = time.perf_counter() - start
        return dataclasses.replace(
            stats, loss=total.item(), loss_der=der.item(), step_seconds=elapsed
        )


@register("derpp")
class DERPlusPlus(ExperienceReplay):
    """DER++: ER plus der_alpha * MSE on the replayed clips' stored pooled embeddings."""

    distill = True


def beta_sample(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw, reproducible from a torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


@register("lump")
class LUMP(ReplayLearner):
    """LUMP: lam * current + (1 - lam) * replayed clip, lam ~ Beta(lump_alpha, lump_alpha)."""

    def mixed(self, batch: Batch, replay: ReplayBatch | None) -> tuple[Tensor, Tensor]:
        """Mixed fbank and frames (B, ...); the unmixed current clips if memory is empty."""
        if replay is None:
            return batch.fbank, batch.frames
        lam = beta_sample(self.cfg.lump_alpha, self.generator)
        pair = pair_index(len(batch), replay.slots.numel(), self.device)
        fbank = lam * batch.fbank + (1 - lam) * replay.items["fbank"][pair]
        return fbank, lam * batch.frames + (1 - lam) * replay.items["frames"][pair]

    def step(self, batch: Batch) -> StepStats:
        start = time.perf_counter()
        batch = batch.to(self.device)
        replay = self.sample_replay(len(batch))
        out = self.mae_step(*self.mixed(batch, replay))
        skipped, norm = self._apply(out.loss)
        self.remember({"fbank": batch.fbank, "frames": batch.frames}, skipped)
        stats = self.replay_stats(self.mae_stats(out, start, skipped, norm), len(batch), replay)
        return dataclasses.replace(stats, step_seconds=time.perf_counter() - start)
