"""Continual methods behind the ``Learner`` seam (DESIGN sections 4-5).

Registered names:

- ``er``       Experience replay: current + replayed clips in one masked-autoencoder batch.
- ``derpp``    ER + 0.5 * MSE between replayed clips' stored pooled embeddings and now.
- ``lump``     Mixup of current and replayed clips, one lambda ~ Beta(0.5, 0.5) per step.
- ``flava``    FLAVA/STELLA: localized alignment (AVM importance) + forget-robust selection.
- ``flava+``   FLAVA storing only the selected patches and their ids (STELLA+).
- ``flava-noimp``  ablation: uniformly random keep-sets at FLAVA's token budget.
- ``flava-nocorr`` ablation: importance selection without the correlation assessment.

Every replay method samples ``replay_batch`` clips (default: the current batch size) from a
reservoir memory, adds the current clips after the update, and adds nothing when the step
was skipped for a non-finite loss (a broken clip must not be replayed forever).

A FLAVA step (``Flava.step``):
1. no-grad pass over all tokens with the pre-update weights: modality blocks, then the
   unimodal fusion pass (the clips' embeddings, ``pre_update``) and the joint code pass;
2. AVM on the code-pass tokens: importance, candidates, prototypes; its matching loss on
   half true / half deranged pairs (the code pass is re-run for the deranged pairs, since
   the joint fusion blocks mix each pair);
3. selection: current clip n against replay clip n's stored prototypes; replay clips from
   their stored C and I with fresh draws (``flava+``: their stored patches);
4. one backbone pass over current + replay with only the selected tokens at their original
   positions; floor(0.2 L) of each selected set visible, the rest reconstructed;
5. loss = rec_a + rec_v + 0.1 nce + avm + 0.5 der; then the current clips enter memory.
Until the AVM's matching accuracy (an EMA) reaches ``warmup_acc`` its importance is noise:
those steps are plain full-token MAE steps on the current clips (``warmup="full"``, the
default, Finetune's memory footprint) or random keep-sets with replay (``warmup="random"``).
``StepStats.selection`` says which, and ``Flava.selection_step`` when selection switched on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.core.avm import AVM, AVMConfig, MatchingResult, matching_pairs
from worker.core.learner import Batch, Learner, LearnerConfig, StepStats, register
from worker.core.memory import ReplayBatch, ReplayMemory
from worker.core.model import MAEOutput, ModelConfig, gather, split_selected
from worker.core.selection import (
    ClipScores,
    Selection,
    SelectionConfig,
    keep_count,
    random_keep,
    select,
    select_replay,
)

# ---------------------------------------------------------------------------------------
# replay baselines


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


def _joined(batch: Batch, replay: ReplayBatch | None) -> tuple[Tensor, Tensor]:
    """Current clips followed by the replayed ones: fbank (B+R, ...), frames (B+R, ...)."""
    if replay is None:
        return batch.fbank, batch.frames
    fbank = torch.cat([batch.fbank, replay.items["fbank"].to(batch.fbank.dtype)])
    return fbank, torch.cat([batch.frames, replay.items["frames"].to(batch.frames.dtype)])


def _pair_index(batch: int, replay: int, device: torch.device) -> Tensor:
    """Replay partner of current clip n: n, cycled when fewer replayed clips, (B,) int64."""
    return torch.arange(batch, device=device) % replay


def der_term(out: MAEOutput, replay: ReplayBatch, batch: int) -> Tensor:
    """MSE(stored, current) pooled embeddings of the replayed clips, audio + video."""
    stored_a, stored_v = replay.items["emb_a"], replay.items["emb_v"]
    loss_a = F.mse_loss(out.pooled_a[batch:].float(), stored_a.float())
    return loss_a + F.mse_loss(out.pooled_v[batch:].float(), stored_v.float())


def _embeddings(out: MAEOutput, batch: int) -> dict[str, Tensor]:
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
        out = self.mae_step(*_joined(batch, replay))
        der = out.loss.new_zeros(())
        if self.distill and replay is not None:
            der = der_term(out, replay, len(batch))
        total = out.loss + self.cfg.der_alpha * der
        skipped, norm = self._apply(total)
        items = {"fbank": batch.fbank, "frames": batch.frames}
        if self.distill:
            items |= _embeddings(out, len(batch))
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
        pair = _pair_index(len(batch), replay.slots.numel(), self.device)
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


# ---------------------------------------------------------------------------------------
# FLAVA


@dataclass
class PreUpdateEmbeddings:
    """Embeddings of a step's current clips from FLAVA's no-grad all-token pass.

    Made with the weights before the step's update, through the unimodal fusion pass: what
    ``Learner.embed`` returned just before the step, at a fraction of its cost.
    """

    emb_a: Tensor  # (B, D) float32
    emb_v: Tensor  # (B, D) float32
    step: int  # updates applied to the weights that produced them
    ids: list[str] | None  # the batch's clip ids, in order


@dataclass
class AlignmentPass:
    """FLAVA's no-grad all-token pass and AVM step for the current clips."""

    scores: ClipScores  # importance, keys, prototypes, candidates (no grad)
    match: MatchingResult  # its loss reaches the AVM parameters only
    embeddings: PreUpdateEmbeddings | None  # None when pre_update_embeddings is off


@dataclass
class TokenPlan:
    """Tokens of the joined batch (current clips, then replayed) the backbone sees."""

    vis_a: Tensor  # (B+R, n_visible(La)) encoder tokens
    tgt_a: Tensor  # (B+R, K_a - n_visible) reconstruction targets
    vis_v: Tensor
    tgt_v: Tensor
    kept_a: int  # audio tokens per clip in encoder + decoder
    kept_v: int
    frac_excluded: Tensor  # scalar: share of tokens excluded by the correlation draws
    selection: bool  # True when the keep-sets came from importance (not warm-up / random)


@dataclass
class FlavaOptions:
    """FLAVA settings read from ``LearnerConfig.options`` (other keys there are ignored)."""

    keep_ratio: float = 0.5  # tokens per modality kept for the backbone
    warmup_acc: float = 0.7  # AVM accuracy EMA that switches selection on (<= 0.5: at once)
    acc_momentum: float = 0.9  # EMA momentum of the AVM accuracy
    warmup: str = "full"  # until then: "full" token steps on current clips, or "random"
    # finish the no-grad pass into the clips' embeddings (``pre_update``) for the worker to
    # publish; off, a step is the paper's training step alone (~7% less work at tiny)
    pre_update_embeddings: bool = True

    @classmethod
    def from_config(cls, cfg: LearnerConfig) -> FlavaOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        opts = cls(**{k: v for k, v in cfg.options.items() if k in known})
        if opts.warmup not in ("full", "random"):
            raise ValueError(f"warmup must be 'full' or 'random', got {opts.warmup!r}")
        return opts


@register("flava")
class Flava(ReplayLearner):
    """FLAVA / STELLA (see the module docstring)."""

    random_selection = False  # flava-noimp: random keep-sets at the same budget
    use_correlation = True  # flava-nocorr: False
    patches_only = False  # flava+: memory holds the selected patches, not the clips

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: LearnerConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(model_cfg, cfg, device)
        self.options = FlavaOptions.from_config(self.cfg)
        self.sel_cfg = SelectionConfig(
            keep_ratio=self.options.keep_ratio,
            chunk_time=self.cfg.audio_chunk,
            correlation=self.use_correlation,
        )
        self.acc_ema = 0.5  # chance level
        self.selection_step: int | None = None  # update count when selection switched on
        self.pre_update: PreUpdateEmbeddings | None = None
        self._maybe_switch_on()

    def build_extra_modules(self) -> dict[str, nn.Module]:
        c, lc = self.model_cfg, self.cfg
        avm_cfg = AVMConfig(
            dim=c.dim,
            heads=c.heads,
            head_dim=c.dim // c.heads,
            tau=lc.importance_temperature,
            candidate_ratio=lc.candidate_ratio,
        )
        return {"avm": AVM(avm_cfg)}

    @property
    def avm(self) -> AVM:
        return self.extra_modules["avm"]  # type: ignore[return-value]

    @property
    def selection_on(self) -> bool:
        return self.selection_step is not None

    # -- 1-2: the no-grad all-token pass and the AVM ------------------------------------

    def alignment_pass(self, batch: Batch) -> AlignmentPass:
        """Pre-update embeddings, AVM scores and the AVM matching loss for the current clips."""
        model = self.model
        with torch.no_grad(), self.autocast():
            ha, hv = model.forward_modality(*model.tokenize(batch.fbank, batch.frames))
            embeddings = self._pre_update(ha, hv, batch.ids)
            za, zv = model.forward_code(ha, hv)
            scores = self.avm.clip_scores(za, zv)
            labels, video_index = matching_pairs(len(batch), self.generator)
            pair_a, pair_v = self._pair_tokens(ha, hv, za, zv, labels, video_index)
        with self.autocast():
            match = self.avm.match(pair_a, pair_v, labels)
        return AlignmentPass(scores, match, embeddings)

    def _pre_update(
        self, ha: Tensor, hv: Tensor, ids: list[str] | None
    ) -> PreUpdateEmbeddings | None:
        """The current clips' embeddings from the all-token hidden states (if asked for)."""
        if not self.options.pre_update_embeddings:
            return None
        emb_a, emb_v = self.model.embed_from_hidden(ha, hv)
        return PreUpdateEmbeddings(emb_a.float(), emb_v.float(), self.step_count, ids)

    def _pair_tokens(
        self, ha: Tensor, hv: Tensor, za: Tensor, zv: Tensor, labels: Tensor, video: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Code-pass tokens of the matching pairs; only the deranged pairs are re-run."""
        neg = (labels == 0).nonzero().squeeze(1).to(ha.device)
        if neg.numel() == 0:
            return za, zv
        neg_a, neg_v = self.model.forward_code(ha[neg], hv[video.to(ha.device)[neg]])
        return za.index_copy(0, neg, neg_a), zv.index_copy(0, neg, neg_v)

    def _update_warmup(self, acc: float) -> None:
        """Track the AVM accuracy EMA; switch selection on (for good) once it passes."""
        m = self.options.acc_momentum
        self.acc_ema = m * self.acc_ema + (1 - m) * acc
        self._maybe_switch_on()

    def _maybe_switch_on(self) -> None:
        if self.selection_step is None and self.acc_ema >= self.options.warmup_acc:
            self.selection_step = self.step_count

    # -- 3: selection -------------------------------------------------------------------

    def select_current(self, scores: ClipScores, replay: ReplayBatch | None) -> Selection:
        """Keep-sets, C and I for the current clips (random ones for ``flava-noimp``)."""
        past_a = replay.items["q_a_hat"] if replay is not None else None
        past_v = replay.items["q_v_hat"] if replay is not None else None
        grid, g = self.model_cfg.audio_grid, self.generator
        sel = select(scores, past_a, past_v, grid, self.sel_cfg, g)
        if self.importance_selection:
            return sel
        keep_a, keep_v = self._random_keep(sel.I_a.shape[0])
        zero = sel.frac_excluded.new_zeros(())
        return dataclasses.replace(sel, keep_a=keep_a, keep_v=keep_v, frac_excluded=zero)

    @property
    def importance_selection(self) -> bool:
        """Whether keep-sets come from importance now (not warm-up, not ``flava-noimp``)."""
        return self.selection_on and not self.random_selection

    def _random_keep(self, batch: int) -> tuple[Tensor, Tensor]:
        """Uniformly random keep-sets (B, K_a), (B, K_v) at the selection budget."""
        c, ratio, g = self.model_cfg, self.sel_cfg.keep_ratio, self.generator
        la, lv = c.num_audio_tokens, c.num_video_tokens
        keep_a = random_keep(batch, la, keep_count(la, ratio), g, self.device)
        return keep_a, random_keep(batch, lv, keep_count(lv, ratio), g, self.device)

    def select_replayed(self, replay: ReplayBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Replayed clips' keep-sets (R, K_a), (R, K_v) and their excluded fraction."""
        it = replay.items
        if self.patches_only:
            return it["ids_a"], it["ids_v"], torch.zeros((), device=self.device)
        if not self.importance_selection:
            keep_a, keep_v = self._random_keep(replay.slots.numel())
            return keep_a, keep_v, torch.zeros((), device=self.device)
        grid, g = self.model_cfg.audio_grid, self.generator
        sel = select_replay(it["C_a"], it["C_v"], it["I_a"], it["I_v"], grid, self.sel_cfg, g)
        return sel.keep_a, sel.keep_v, sel.frac_excluded

    # -- 4: the backbone batch ----------------------------------------------------------

    def plan(self, current: Selection, replay: ReplayBatch | None) -> TokenPlan:
        """Visible/target tokens for current + replayed clips, inside their keep-sets."""
        keep_a, keep_v, frac = current.keep_a, current.keep_v, current.frac_excluded.float()
        if replay is not None:
            rep_a, rep_v, rep_frac = self.select_replayed(replay)
            keep_a, keep_v = torch.cat([keep_a, rep_a]), torch.cat([keep_v, rep_v])
            b, r = current.keep_a.shape[0], rep_a.shape[0]
            frac = (frac * b + rep_frac.float() * r) / (b + r)
        c, g = self.model_cfg, self.generator
        vis_a, tgt_a = split_selected(keep_a, c.n_visible(c.num_audio_tokens), g)
        vis_v, tgt_v = split_selected(keep_v, c.n_visible(c.num_video_tokens), g)
        kept_a, kept_v = keep_a.shape[1], keep_v.shape[1]
        importance = self.importance_selection
        return TokenPlan(vis_a, tgt_a, vis_v, tgt_v, kept_a, kept_v, frac, importance)

    def full_plan(self, batch: int) -> TokenPlan:
        """Warm-up: plain MAE split of all tokens."""
        c = self.model_cfg
        idx = self.random_indices(batch)
        zero = torch.zeros((), device=self.device)
        return TokenPlan(*idx, c.num_audio_tokens, c.num_video_tokens, zero, False)

    def replay_clips(self, replay: ReplayBatch) -> tuple[Tensor, Tensor]:
        """fbank, frames of the replayed clips; ``flava+`` rebuilds them from stored patches.

        Pixels outside the stored patches are zeros; the backbone never reads them because
        the replayed clips' keep-sets are exactly the stored ids.
        """
        it = replay.items
        if not self.patches_only:
            return it["fbank"], it["frames"]
        c = self.model_cfg
        pa = _scatter_tokens(it["tokens_a"], it["ids_a"], c.num_audio_tokens)
        pv = _scatter_tokens(it["tokens_v"], it["ids_v"], c.num_video_tokens)
        return self.model.unpatchify_audio(pa), self.model.unpatchify_video(pv)

    # -- 5: the step --------------------------------------------------------------------

    def step(self, batch: Batch) -> StepStats:
        start = time.perf_counter()
        batch = batch.to(self.device)
        self.model.train()
        align = self.alignment_pass(batch)
        self.pre_update = align.embeddings
        # the AVM's graph (all tokens of the current clips) is freed before the backbone's
        avm = self.backward_early(self.cfg.avm_weight * align.match.loss)
        full = not self.selection_on and self.options.warmup == "full"
        replay = None if full else self.sample_replay(len(batch))
        current = self.select_current(align.scores, replay)
        plan = self.full_plan(len(batch)) if full else self.plan(current, replay)
        fbank, frames = self._inputs(batch, replay)
        idx = (plan.vis_a, plan.tgt_a, plan.vis_v, plan.tgt_v)
        with self.autocast():
            out = self.model.mae_loss(fbank, frames, *idx)
        der = der_term(out, replay, len(batch)) if replay is not None else out.loss.new_zeros(())
        backbone = out.loss + self.cfg.der_alpha * der
        skipped, norm = self._apply(backbone, early=avm)
        total = backbone.detach() + avm
        self.remember(self._memory_items(batch, align.scores, current, out), skipped)
        if bool((align.match.labels == 0).any()):  # batches under 3 clips have no negatives
            self._update_warmup(float(align.match.acc))
        stats = self._stats(out, align, plan, (total, der), (start, skipped, norm))
        return self.replay_stats(stats, len(batch), replay)

    def _inputs(self, batch: Batch, replay: ReplayBatch | None) -> tuple[Tensor, Tensor]:
        if replay is None:
            return batch.fbank, batch.frames
        fbank, frames = self.replay_clips(replay)
        return torch.cat([batch.fbank, fbank]), torch.cat([batch.frames, frames])

    def _memory_items(
        self, batch: Batch, scores: ClipScores, sel: Selection, out: MAEOutput
    ) -> dict[str, Tensor]:
        """What a current clip leaves in memory: the clip (or its kept patches) and scores."""
        items = {
            **_embeddings(out, len(batch)),
            "q_a_hat": scores.proto_a.float(),
            "q_v_hat": scores.proto_v.float(),
        }
        if self.patches_only:
            return {**items, **self._kept_patches(batch, sel)}
        scores_items = {"C_a": sel.C_a, "C_v": sel.C_v, "I_a": sel.I_a, "I_v": sel.I_v}
        clip = {"fbank": batch.fbank, "frames": batch.frames}
        return {**items, **clip, **{k: v.float() for k, v in scores_items.items()}}

    def _kept_patches(self, batch: Batch, sel: Selection) -> dict[str, Tensor]:
        """flava+: the selected patches (B, K, patch_dim) and their token ids (B, K)."""
        pa, pv = self.model.patchify_audio(batch.fbank), self.model.patchify_video(batch.frames)
        return {
            "tokens_a": gather(pa, sel.keep_a),
            "ids_a": sel.keep_a,
            "tokens_v": gather(pv, sel.keep_v),
            "ids_v": sel.keep_v,
        }

    def _stats(
        self,
        out: MAEOutput,
        align: AlignmentPass,
        plan: TokenPlan,
        losses: tuple[Tensor, Tensor],
        timing: tuple[float, bool, float],
    ) -> StepStats:
        start, skipped, norm = timing
        base = self.mae_stats(out, start, skipped, norm)
        terms = torch.stack([losses[0].float(), align.match.loss, losses[1].float()])
        total, avm_loss, der = terms.detach().cpu().tolist()
        c = self.model_cfg
        return dataclasses.replace(
            base,
            loss=total,
            loss_avm=avm_loss,
            loss_der=der,
            avm_acc=float(align.match.acc),
            tokens_kept_a=plan.kept_a,
            tokens_kept_v=plan.kept_v,
            tokens_visible_a=c.n_visible(c.num_audio_tokens),
            tokens_visible_v=c.n_visible(c.num_video_tokens),
            frac_excluded=float(plan.frac_excluded),
            selection=plan.selection,
            step_seconds=time.perf_counter() - start,
        )

    def extra_state(self) -> dict[str, Any]:
        step = -1 if self.selection_step is None else self.selection_step
        return {**super().extra_state(), "acc_ema": self.acc_ema, "selection_step": step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.acc_ema = float(state["acc_ema"])
        step = int(state["selection_step"])
        self.selection_step = None if step < 0 else step


def _scatter_tokens(tokens: Tensor, ids: Tensor, length: int) -> Tensor:
    """tokens (B, K, P) at ids (B, K) into zeros (B, length, P)."""
    out = tokens.new_zeros(tokens.shape[0], length, tokens.shape[2])
    return out.scatter_(1, ids[..., None].expand(-1, -1, tokens.shape[2]), tokens)


@register("flava+")
class FlavaPlus(Flava):
    """STELLA+: memory keeps only each clip's selected patches and their token ids."""

    patches_only = True


@register("flava-noimp")
class FlavaNoImportance(Flava):
    """Ablation: uniformly random keep-sets at FLAVA's token budget (AVM still trained)."""

    random_selection = True


@register("flava-nocorr")
class FlavaNoCorrelation(Flava):
    """Ablation: importance-based keep-sets without the replay-guided correlation (C = 0)."""

    use_correlation = False
