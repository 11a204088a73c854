"""FLAVA / STELLA behind the ``Learner`` seam (docs/architecture.md, the core modules).

Registered names:

- ``flava``        localized alignment (AVM importance) + forget-robust patch selection.
- ``flava+``       FLAVA storing only the selected patches and their ids (STELLA+).
- ``flava-noimp``  ablation: uniformly random keep-sets at FLAVA's token budget.
- ``flava-nocorr`` ablation: importance selection without the correlation assessment.

A step (``Flava.step``) is four stages:

1. alignment (``alignment_pass``): a no-grad pass over all tokens with the pre-update
   weights -- modality blocks, then the unimodal fusion pass (the clips' embeddings, see
   ``take_step_embeddings``) and the joint code pass; the AVM on the code-pass tokens gives
   importance, candidates and prototypes, and its matching loss on half true / half
   deranged pairs (the code pass is re-run for the deranged pairs, since the joint fusion
   blocks mix each pair);
2. selection (``select_current``, ``plan``): replayed clips sampled; current clip n against
   replay clip n's stored prototypes, replayed clips from their stored C and I with fresh
   draws (``flava+``: their stored patches); floor(0.2 L) of each keep-set visible to the
   encoder, the rest reconstructed;
3. update (``update``): the AVM's loss backpropagated first (its graph is freed before the
   backbone's), then one backbone pass over current + replayed clips with only the planned
   tokens at their original positions; loss = rec_a + rec_v + 0.1 nce + avm + 0.5 der; one
   optimizer step (the AVM in its own parameter group at ``LearnerConfig.avm_lr``);
4. memory (``memory_items``): the current clips enter memory with their pooled embeddings,
   prototypes, C and I (``flava+``: the kept patches and their ids instead of the clips),
   and the gate sees the AVM's accuracy on the batch.

The gate. Until the EMA of the AVM's matching accuracy reaches ``warmup_acc`` its importance
is noise, so keep-sets do not come from it. The backbone is protected from the first clip
all the same: while the gate is closed a step is a full-token DER++ step -- replayed clips
sampled, every token of current and replayed clips in the masked-autoencoder split, the DER
term on the replayed clips -- and the AVM trains on every batch. Memory entries written then
carry what later selection reads (C, I, prototypes, embeddings). ``flava+`` replays only
stored patches, so while its gate is closed the current clips get uniformly random keep-sets
at the selection budget (the patches it stores: the AVM's importance is noise then) and the
replayed clips their stored ones. ``StepStats.selection`` says whether importance drove a
step; ``selection_state()`` gives the accuracy EMA and the update where selection switched on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from worker.core.avm import AVM, AVMConfig, MatchingResult, matching_pairs
from worker.core.learner import (
    Batch,
    LearnerConfig,
    PreUpdateEmbeddings,
    SelectionState,
    StepStats,
    register,
)
from worker.core.memory import ReplayBatch
from worker.core.model import AVMAE, MAEOutput, ModelConfig, gather, split_selected
from worker.core.replay import ReplayLearner, der_term, stored_embeddings
from worker.core.selection import (
    ClipScores,
    Selection,
    SelectionConfig,
    keep_count,
    random_keep,
    select,
    select_replay,
)

# how a step picks the backbone's tokens: from importance, random keep-sets, or every token
KeepRule = Literal["importance", "random", "all"]


@dataclass
class FlavaOptions:
    """FLAVA settings read from ``LearnerConfig.options`` (other keys there are ignored)."""

    keep_ratio: float = 0.5  # tokens per modality kept for the backbone
    warmup_acc: float = 0.7  # AVM accuracy EMA that switches selection on (<= 0.5: at once)
    acc_momentum: float = 0.9  # EMA momentum of the AVM accuracy
    # finish the no-grad pass into the clips' embeddings (``take_step_embeddings``) for the
    # worker to publish; off, a step is the paper's training step alone (~7% less work at tiny)
    pre_update_embeddings: bool = True

    @classmethod
    def from_config(cls, cfg: LearnerConfig) -> FlavaOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.options.items() if k in known})


@dataclass
class SelectionGate:
    """Switches selection on, for good, once the AVM's accuracy EMA reaches ``threshold``."""

    threshold: float
    momentum: float
    acc_ema: float = 0.5  # chance level
    selection_step: int | None = None  # update count when selection switched on

    @property
    def on(self) -> bool:
        return self.selection_step is not None

    def observe(self, acc: float, step: int) -> None:
        """One batch's matching accuracy, after ``step`` updates."""
        self.acc_ema = self.momentum * self.acc_ema + (1 - self.momentum) * acc
        self.check(step)

    def check(self, step: int) -> None:
        if self.selection_step is None and self.acc_ema >= self.threshold:
            self.selection_step = step

    def state(self) -> SelectionState:
        return SelectionState(self.acc_ema, self.selection_step)


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
    selection: bool  # True when the keep-sets came from importance

    @property
    def indices(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.vis_a, self.tgt_a, self.vis_v, self.tgt_v


class Update(NamedTuple):
    """What the update stage did."""

    out: MAEOutput  # the backbone's losses and pooled embeddings, current clips first
    der: Tensor  # DER term (0 without replay)
    total: Tensor  # detached: backbone loss + der_alpha * der + avm_weight * avm
    skipped: bool
    grad_norm: float


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
        self.gate = SelectionGate(self.options.warmup_acc, self.options.acc_momentum)
        self.gate.check(self.step_count)
        self._step_embeddings: PreUpdateEmbeddings | None = None

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

    def module_lr(self, name: str) -> float:
        return self.cfg.avm_lr if name == "avm" else self.cfg.lr

    @property
    def avm(self) -> AVM:
        return self.extra_modules["avm"]  # type: ignore[return-value]

    @property
    def selection_step(self) -> int | None:
        """Update count when selection switched on; None while the gate is closed."""
        return self.gate.selection_step

    def keep_rule(self) -> KeepRule:
        """How this step picks tokens (see the module docstring on the gate)."""
        if not self.gate.on:
            return "random" if self.patches_only else "all"
        return "random" if self.random_selection else "importance"

    # -- the worker's interface ---------------------------------------------------------

    def take_step_embeddings(self) -> PreUpdateEmbeddings | None:
        embeddings, self._step_embeddings = self._step_embeddings, None
        return embeddings

    def trust_alignment(self, heldout_acc: float) -> None:
        """Start the gate's EMA at the pretrained AVM's held-out accuracy: selection is on
        from the first update when that passes ``warmup_acc``, as in the paper."""
        self.gate.acc_ema = float(heldout_acc)
        self.gate.check(self.step_count)

    def selection_state(self) -> SelectionState:
        return self.gate.state()

    # -- the step -----------------------------------------------------------------------

    def step(self, batch: Batch) -> StepStats:
        start = time.perf_counter()
        batch = batch.to(self.device)
        self.model.train()
        rule = self.keep_rule()
        align = self.alignment_pass(batch)
        self._step_embeddings = align.embeddings
        replay = self.sample_replay(len(batch))
        current = self.select_current(align.scores, replay, rule)
        plan = self.plan(current, replay, rule)
        update = self.update(batch, replay, plan, align.match)
        self.remember(self.memory_items(batch, align.scores, current, update.out), update.skipped)
        self.track_gate(align.match)
        stats = self._stats(align, plan, update, start)
        return self.replay_stats(stats, len(batch), replay)

    # -- 1: alignment -------------------------------------------------------------------

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

    # -- 2: selection -------------------------------------------------------------------

    def select_current(
        self, scores: ClipScores, replay: ReplayBatch | None, rule: KeepRule
    ) -> Selection:
        """C, I and keep-sets of the current clips (random keep-sets under ``rule`` "random").

        C and I are computed under every rule: memory entries carry them for later steps."""
        past_a = replay.items["q_a_hat"] if replay is not None else None
        past_v = replay.items["q_v_hat"] if replay is not None else None
        grid, g = self.model_cfg.audio_grid, self.generator
        sel = select(scores, past_a, past_v, grid, self.sel_cfg, g)
        if rule != "random":
            return sel
        keep_a, keep_v = self._random_keep(sel.I_a.shape[0])
        zero = sel.frac_excluded.new_zeros(())
        return dataclasses.replace(sel, keep_a=keep_a, keep_v=keep_v, frac_excluded=zero)

    def _random_keep(self, batch: int) -> tuple[Tensor, Tensor]:
        """Uniformly random keep-sets (B, K_a), (B, K_v) at the selection budget."""
        c, ratio, g = self.model_cfg, self.sel_cfg.keep_ratio, self.generator
        la, lv = c.num_audio_tokens, c.num_video_tokens
        keep_a = random_keep(batch, la, keep_count(la, ratio), g, self.device)
        return keep_a, random_keep(batch, lv, keep_count(lv, ratio), g, self.device)

    def select_replayed(self, replay: ReplayBatch, rule: KeepRule) -> tuple[Tensor, Tensor, Tensor]:
        """Replayed clips' keep-sets (R, K_a), (R, K_v) and their excluded fraction."""
        it, zero = replay.items, torch.zeros((), device=self.device)
        if self.patches_only:
            return it["ids_a"], it["ids_v"], zero
        if rule == "random":
            return (*self._random_keep(replay.slots.numel()), zero)
        grid, g = self.model_cfg.audio_grid, self.generator
        sel = select_replay(it["C_a"], it["C_v"], it["I_a"], it["I_v"], grid, self.sel_cfg, g)
        return sel.keep_a, sel.keep_v, sel.frac_excluded

    def plan(self, current: Selection, replay: ReplayBatch | None, rule: KeepRule) -> TokenPlan:
        """Visible/target tokens for current + replayed clips, inside their keep-sets."""
        replayed = 0 if replay is None else replay.slots.numel()
        if rule == "all":
            return self.full_plan(current.keep_a.shape[0] + replayed)
        keep_a, keep_v, frac = current.keep_a, current.keep_v, current.frac_excluded.float()
        if replay is not None:
            rep_a, rep_v, rep_frac = self.select_replayed(replay, rule)
            keep_a, keep_v = torch.cat([keep_a, rep_a]), torch.cat([keep_v, rep_v])
            b = current.keep_a.shape[0]
            frac = (frac * b + rep_frac.float() * replayed) / (b + replayed)
        c, g = self.model_cfg, self.generator
        vis_a, tgt_a = split_selected(keep_a, c.n_visible(c.num_audio_tokens), g)
        vis_v, tgt_v = split_selected(keep_v, c.n_visible(c.num_video_tokens), g)
        kept_a, kept_v = keep_a.shape[1], keep_v.shape[1]
        return TokenPlan(vis_a, tgt_a, vis_v, tgt_v, kept_a, kept_v, frac, rule == "importance")

    def full_plan(self, batch: int) -> TokenPlan:
        """Gate closed: the plain masked-autoencoder split of every token."""
        c = self.model_cfg
        idx = self.random_indices(batch)
        zero = torch.zeros((), device=self.device)
        return TokenPlan(*idx, c.num_audio_tokens, c.num_video_tokens, zero, False)

    # -- 3: update ----------------------------------------------------------------------

    def update(
        self, batch: Batch, replay: ReplayBatch | None, plan: TokenPlan, match: MatchingResult
    ) -> Update:
        """AVM loss, then the backbone's on the planned tokens; one optimizer step."""
        avm = self.backward_early(self.cfg.avm_weight * match.loss)
        fbank, frames = self.inputs(batch, replay)
        with self.autocast():
            out = self.model.mae_loss(fbank, frames, *plan.indices)
        der = der_term(out, replay, len(batch)) if replay is not None else out.loss.new_zeros(())
        backbone = out.loss + self.cfg.der_alpha * der
        skipped, norm = self._apply(backbone, early=avm)
        return Update(out, der, backbone.detach() + avm, skipped, norm)

    def inputs(self, batch: Batch, replay: ReplayBatch | None) -> tuple[Tensor, Tensor]:
        """fbank (B+R, ...), frames (B+R, ...): the current clips, then the replayed ones."""
        if replay is None:
            return batch.fbank, batch.frames
        fbank, frames = self.replay_clips(replay)
        return torch.cat([batch.fbank, fbank]), torch.cat([batch.frames, frames])

    def replay_clips(self, replay: ReplayBatch) -> tuple[Tensor, Tensor]:
        """fbank, frames of the replayed clips; ``flava+`` rebuilds them from stored patches."""
        if not self.patches_only:
            return replay.items["fbank"], replay.items["frames"]
        return rebuild_clips(self.model, replay.items)

    # -- 4: memory ----------------------------------------------------------------------

    def memory_items(
        self, batch: Batch, scores: ClipScores, sel: Selection, out: MAEOutput
    ) -> dict[str, Tensor]:
        """What a current clip leaves in memory: the clip (or its kept patches) and scores."""
        items = {
            **stored_embeddings(out, len(batch)),
            "q_a_hat": scores.proto_a.float(),
            "q_v_hat": scores.proto_v.float(),
        }
        if self.patches_only:
            return {**items, **kept_patches(self.model, batch, sel)}
        scores_items = {"C_a": sel.C_a, "C_v": sel.C_v, "I_a": sel.I_a, "I_v": sel.I_v}
        clip = {"fbank": batch.fbank, "frames": batch.frames}
        return {**items, **clip, **{k: v.float() for k, v in scores_items.items()}}

    def track_gate(self, match: MatchingResult) -> None:
        """The batch's AVM accuracy to the gate (batches under 3 clips have no negatives)."""
        if bool((match.labels == 0).any()):
            self.gate.observe(float(match.acc), self.step_count)

    # -- stats and checkpoints ----------------------------------------------------------

    def _stats(
        self, align: AlignmentPass, plan: TokenPlan, update: Update, start: float
    ) -> StepStats:
        base = self.mae_stats(update.out, start, update.skipped, update.grad_norm)
        terms = torch.stack([update.total.float(), align.match.loss, update.der.float()])
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
        step = -1 if self.gate.selection_step is None else self.gate.selection_step
        return {**super().extra_state(), "acc_ema": self.gate.acc_ema, "selection_step": step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.gate.acc_ema = float(state["acc_ema"])
        step = int(state["selection_step"])
        self.gate.selection_step = None if step < 0 else step


def kept_patches(model: AVMAE, batch: Batch, sel: Selection) -> dict[str, Tensor]:
    """flava+ memory: the selected patches (B, K, patch_dim) and their token ids (B, K)."""
    pa, pv = model.patchify_audio(batch.fbank), model.patchify_video(batch.frames)
    return {
        "tokens_a": gather(pa, sel.keep_a),
        "ids_a": sel.keep_a,
        "tokens_v": gather(pv, sel.keep_v),
        "ids_v": sel.keep_v,
    }


def rebuild_clips(model: AVMAE, items: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """fbank, frames from ``kept_patches`` items; zeros outside the stored patches.

    The backbone never reads those zeros: a replayed clip's keep-set is its stored ids."""
    c = model.cfg
    pa = _scatter_tokens(items["tokens_a"], items["ids_a"], c.num_audio_tokens)
    pv = _scatter_tokens(items["tokens_v"], items["ids_v"], c.num_video_tokens)
    return model.unpatchify_audio(pa), model.unpatchify_video(pv)


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
