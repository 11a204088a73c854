"""The learner seam: one interface every continual method plugs into.

A ``Learner`` owns the backbone (``AVMAE``), any extra modules a method needs (the AVM),
one Adam optimizer over all of them (one parameter group per module, each with its own
learning rate), a CPU ``torch.Generator`` for every random draw, and its counters.

The worker knows a method only through this interface: ``step(batch)`` once per batch of
stream clips, ``take_step_embeddings()`` for the embeddings a step made of its clips (if it
made any), ``selection_state()`` for a method that gates patch selection, ``embed(batch)``
to serve embeddings, and ``state_dict()``/``load_state_dict()`` for checkpoints (tensors
and plain containers only, so ``torch.load(weights_only=True)`` reads them).

Methods register by name::

    @register("er")
    class ExperienceReplay(Learner): ...

``build_learner`` imports ``worker.core.methods`` (which imports the replay baselines and
FLAVA) so their registrations happen before the name is looked up.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from worker.core.memory import ReplayMemory
from worker.core.model import AVMAE, MAEOutput, ModelConfig, random_split

logger = logging.getLogger(__name__)

METHODS_MODULE = "worker.core.methods"


@dataclass
class Batch:
    """A batch of decoded clips.

    fbank (B, audio_frames, mel_bins); frames (B, num_frames, 3, S, S); ids one string
    per clip (the clip's sha256 in the service); labels (B,) int64 where known.
    """

    fbank: Tensor
    frames: Tensor
    ids: list[str] | None = None
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {self.fbank.shape[0], self.frames.shape[0]}
        sizes |= {len(self.ids)} if self.ids is not None else set()
        sizes |= {self.labels.shape[0]} if self.labels is not None else set()
        if len(sizes) != 1:
            raise ValueError(f"batch fields disagree on the batch size: {sorted(sizes)}")

    def __len__(self) -> int:
        return self.fbank.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the tensors on ``device`` (ids are shared)."""
        labels = (
            self.labels.to(device, non_blocking=non_blocking) if self.labels is not None else None
        )
        return Batch(
            self.fbank.to(device, non_blocking=non_blocking),
            self.frames.to(device, non_blocking=non_blocking),
            self.ids,
            labels,
        )


@dataclass
class StepStats:
    """What one ``step`` did; zeros where a method has no such term."""

    loss: float = 0.0  # total loss that was (or would have been) backpropagated
    loss_rec_a: float = 0.0  # audio masked reconstruction
    loss_rec_v: float = 0.0  # video masked reconstruction
    loss_nce: float = 0.0  # contrastive InfoNCE (unweighted)
    loss_avm: float = 0.0  # AVM matching BCE
    loss_der: float = 0.0  # DER++ embedding distillation on replay clips
    avm_acc: float = 0.0  # AVM matching accuracy on this batch, in [0, 1]
    tokens_kept_a: int = 0  # audio tokens per clip in encoder + decoder
    tokens_kept_v: int = 0  # video tokens per clip in encoder + decoder
    tokens_visible_a: int = 0  # audio tokens per clip the encoder sees
    tokens_visible_v: int = 0  # video tokens per clip the encoder sees
    frac_excluded: float = 0.0  # candidate tokens excluded by the correlation draw
    selection: bool = False  # whether importance-based selection drove this step
    batch_size: int = 0  # current clips in the step
    replay_size: int = 0  # replayed clips in the step
    memory_fill: int = 0  # clips in the replay memory after the step
    memory_bytes: int = 0  # bytes held by the replay memory
    grad_norm: float = 0.0  # total gradient norm before clipping
    step: int = 0  # updates applied so far (after this step)
    step_seconds: float = 0.0  # wall time of the step
    skipped: bool = False  # non-finite loss or gradient: no parameter changed

    def as_dict(self) -> dict[str, float | int | bool]:
        return dataclasses.asdict(self)


@dataclass
class PreUpdateEmbeddings:
    """Retrieval embeddings of a step's current clips, made during the step.

    Made with the weights before the step's update: what ``Learner.embed`` returned just
    before the step (FLAVA gets them from its no-grad all-token pass at a fraction of the
    cost of a fresh pass).
    """

    emb_a: Tensor  # (B, D) float32
    emb_v: Tensor  # (B, D) float32
    step: int  # updates applied to the weights that produced them
    ids: list[str] | None  # the batch's clip ids, in order


@dataclass(frozen=True)
class SelectionState:
    """Where a method that gates patch selection on its alignment module stands."""

    avm_accuracy_ema: float  # EMA of the AVM's matching accuracy on the current batches
    selection_step: int | None  # update count when selection switched on; None: not yet

    @property
    def on(self) -> bool:
        return self.selection_step is not None


@dataclass
class LearnerConfig:
    """Optimisation and method settings (defaults from the paper)."""

    lr: float = 1e-4  # Adam learning rate of the backbone, constant (paper)
    # Adam learning rate of the AVM (methods that have one), constant. Not the paper's 1e-4:
    # the authors pretrain the AVM for many epochs, a stream starts it cold, and until its
    # matching accuracy is clearly above chance selection stays off. Measured by the
    # continual benchmark's AVM pretraining (PretrainConfig.avm_lr): 250 steps at 1e-4 left
    # it near chance (held-out accuracy 0.56), 300 steps at 1e-3 reached 0.83.
    avm_lr: float = 1e-3
    betas: tuple[float, float] = (0.95, 0.999)  # Adam betas
    weight_decay: float = 5e-7  # Adam (L2) weight decay
    grad_clip: float = 0.0  # max total gradient norm; 0 disables clipping
    amp: bool = True  # bf16 autocast, on CUDA only
    seed: int = 0  # seeds model init and the learner's generator
    memory_size: int = 2000  # replay memory capacity in clips (per rank)
    replay_batch: int | None = None  # replayed clips per step; None = current batch size
    der_alpha: float = 0.5  # DER++ / FLAVA distillation weight
    lump_alpha: float = 0.5  # LUMP mixup Beta(alpha, alpha)
    avm_weight: float = 1.0  # weight of the AVM matching loss
    importance_temperature: float = 0.4  # tau of the AVM importance softmax
    candidate_ratio: float = 0.5  # fraction of tokens that are selection candidates
    audio_chunk: int = 4  # time steps per audio selection chunk
    options: dict[str, Any] = field(default_factory=dict)  # further method settings


class Gradients:
    """How the gradients of a step become the update's: as computed, in one process.

    A rank group replaces it with ``worker.core.distributed.AllReduceGradients``, which
    averages them over the ranks; the learners call it once per step either way."""

    def average(self, params: list[nn.Parameter], contributes: bool, finite: bool) -> bool:
        """Leave in each ``p.grad`` the gradient to apply; False when the step is skipped:
        a loss was not finite (this process's or, in a group, any rank's), or no process
        contributed a gradient."""
        return contributes and finite


class Learner:
    """Base class: model, optimizer, generator and counters; subclasses define ``step``.

    Hooks for subclasses: ``build_extra_modules`` (e.g. the AVM; trained by the same
    optimizer, in its own parameter group at ``module_lr(name)``, and saved with the
    model), ``extra_state``/``load_extra_state`` (e.g. the replay memory), and the
    interface methods the worker reads after a step (``take_step_embeddings``,
    ``selection_state``; None here).
    """

    name: ClassVar[str] = "learner"

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: LearnerConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model_cfg = model_cfg
        self.cfg = cfg or LearnerConfig()
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)  # reproducible init, global RNG left as it was
            self.model = AVMAE(model_cfg).to(self.device)
            self.extra_modules = nn.ModuleDict(self.build_extra_modules()).to(self.device)
        self.generator = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        self.optimizer = self.build_optimizer()
        self.gradients = Gradients()  # a rank group's all-reduce, set by worker/ranks.py
        self.step_count = 0  # updates applied
        self.skipped_count = 0  # steps skipped for a non-finite loss or gradient

    # -- hooks --------------------------------------------------------------------------

    def build_extra_modules(self) -> dict[str, nn.Module]:
        """Modules beside the backbone, built under the learner's seed."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Method state to checkpoint (tensors and plain containers only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    def module_lr(self, name: str) -> float:
        """Learning rate of the extra module ``name``'s parameter group."""
        return self.cfg.lr

    def step(self, batch: Batch) -> StepStats:
        """One update from a batch of current clips."""
        raise NotImplementedError

    def take_step_embeddings(self) -> PreUpdateEmbeddings | None:
        """The embeddings the last ``step`` made of its clips, once (taking clears them);
        None when it made none (then embed the clips with ``embed``)."""
        return None

    def replay_memory(self) -> ReplayMemory | None:
        """The replay memory, for checkpoints that store it as segments; None without one."""
        return None

    def selection_state(self) -> SelectionState | None:
        """The patch-selection gate of methods that have one; None for the others."""
        return None

    def trust_alignment(self, heldout_acc: float) -> None:
        """Pretrained alignment weights were loaded whose AVM scored ``heldout_acc`` matching
        accuracy on held-out clips: methods with a gate start it there (no-op here)."""

    # -- shared machinery ---------------------------------------------------------------

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.parameters()
        yield from self.extra_modules.parameters()

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer group per module: "backbone", then each extra module by name.

        Parameters are in ``parameters()`` order, so the optimizer's parameter indices are
        the same as with one group (older checkpoints had one; see ``_regroup``)."""
        modules: list[tuple[str, nn.Module, float]] = [("backbone", self.model, self.cfg.lr)]
        modules += [(n, m, self.module_lr(n)) for n, m in self.extra_modules.items()]
        groups = []
        for name, module, lr in modules:
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params, "lr": lr})
        return groups

    def build_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        # the fused kernel: one pass over every tensor, ~5x faster than the per-tensor loop
        # Adam runs on the CPU by default (and the default foreach path on CUDA)
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(
            self.param_groups(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay, fused=fused
        )

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on CUDA when ``cfg.amp``; a no-op elsewhere."""
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def random_indices(self, batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Plain MAE split of every token: (vis_a, tgt_a, vis_v, tgt_v), each (B, K)."""
        c = self.model_cfg
        la, lv = c.num_audio_tokens, c.num_video_tokens
        vis_a, tgt_a = random_split(batch, la, c.n_visible(la), self.generator, self.device)
        vis_v, tgt_v = random_split(batch, lv, c.n_visible(lv), self.generator, self.device)
        return vis_a, tgt_a, vis_v, tgt_v

    def backward_early(self, loss: Tensor) -> Tensor:
        """Zero the gradients and backprop ``loss`` now, so that its graph is freed before
        the rest of the step builds its own (peak memory = the larger graph, not the sum).

        Returns ``loss`` detached, to pass to ``_apply(..., early=)``: a non-finite value
        there skips the step, and the gradients it left are zeroed."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    def _apply(self, loss: Tensor, early: Tensor | None = None) -> tuple[bool, float]:
        """Backprop ``loss`` and step, unless it, ``early`` or a gradient is not finite.

        ``early`` is a loss already backpropagated by ``backward_early`` this step.
        Returns (skipped, grad_norm). A skipped step changes no parameter and no
        optimizer state.
        """
        if early is None:
            self.optimizer.zero_grad(set_to_none=True)
        checked = loss.detach() if early is None else loss.detach() + early
        finite = bool(torch.isfinite(checked))
        if finite:
            loss.backward()
        return self._update(contributes=finite, finite=finite)

    def _update(self, contributes: bool, finite: bool) -> tuple[bool, float]:
        """Apply the gradients left in ``p.grad`` (averaged over a rank group first; a
        process that does not contribute takes part with none). Every process of a group
        gets the same averaged gradients and flags, so all skip or all step: weights stay
        equal. A non-finite loss anywhere skips the step, as it would in one process."""
        if not contributes:
            self.optimizer.zero_grad(set_to_none=True)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not self.gradients.average(params, contributes, finite):
            return self._skip(math.nan)
        norm = self._grad_norm()
        if not math.isfinite(norm):
            return self._skip(norm)
        self.optimizer.step()
        self.step_count += 1
        return False, norm

    def sit_out(self) -> StepStats:
        """Take part in a rank group's update with no clips of one's own (this rank's share
        of the stream ran dry): the update is the other ranks' averaged gradient."""
        start = time.perf_counter()
        skipped, norm = self._update(contributes=False, finite=True)
        elapsed = time.perf_counter() - start
        return StepStats(
            grad_norm=norm, step=self.step_count, step_seconds=elapsed, skipped=skipped
        )

    def _grad_norm(self) -> float:
        """Total gradient norm; gradients are clipped to ``cfg.grad_clip`` when it is > 0.

        Without clipping only the norm is computed: clip_grad_norm_(inf) would also multiply
        every gradient by 1."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        grads = [p.grad for p in params if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _skip(self, norm: float) -> tuple[bool, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_count += 1
        logger.warning("non-finite loss or gradient at update %d: step skipped", self.step_count)
        return True, norm

    def mae_stats(self, out: MAEOutput, start: float, skipped: bool, norm: float) -> StepStats:
        """StepStats for a plain masked-autoencoder step on all tokens."""
        terms = torch.stack([out.loss, out.loss_rec_a, out.loss_rec_v, out.loss_nce])
        loss, rec_a, rec_v, nce = terms.detach().float().tolist()  # one device sync
        c = self.model_cfg
        la, lv = c.num_audio_tokens, c.num_video_tokens
        return StepStats(
            loss=loss,
            loss_rec_a=rec_a,
            loss_rec_v=rec_v,
            loss_nce=nce,
            tokens_kept_a=la,
            tokens_kept_v=lv,
            tokens_visible_a=c.n_visible(la),
            tokens_visible_v=c.n_visible(lv),
            batch_size=out.pooled_a.shape[0],
            grad_norm=norm,
            step=self.step_count,
            step_seconds=time.perf_counter() - start,
            skipped=skipped,
        )

    # -- serving and checkpoints --------------------------------------------------------

    @torch.no_grad()
    def embed(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Retrieval embeddings of unmasked clips: (a (B, D), v (B, D)) float32, on device."""
        batch = batch.to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                emb_a, emb_v = self.model.embed(batch.fbank, batch.frames)
        finally:
            self.model.train(was_training)
        return emb_a.float(), emb_v.float()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimizer, counters, RNG, method state."""
        return {
            "method": self.name,
            "model_cfg": dataclasses.asdict(self.model_cfg),
            "model": self.model.state_dict(),
            "extra_modules": self.extra_modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "skipped": self.skipped_count,
            "generator": self.generator.get_state(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``. From another method only the backbone is taken."""
        self.model.load_state_dict(state["model"])
        self.step_count = int(state["step"])
        self.skipped_count = int(state.get("skipped", 0))
        self.generator.set_state(state["generator"])
        if state.get("method") != self.name:
            logger.warning(
                "checkpoint of method %r loaded into %r: backbone only, fresh optimizer",
                state.get("method"),
                self.name,
            )
            return
        self.extra_modules.load_state_dict(state["extra_modules"])
        self.load_optimizer_state(state["optimizer"])
        self.load_extra_state(state["extra"])

    def load_optimizer_state(self, saved: dict[str, Any]) -> None:
        """Restore the optimizer's moments; learning rates stay the configured ones.

        Learning rates are settings, not state: a restart with another ``lr``/``avm_lr``
        uses the new ones. A checkpoint from before the per-module groups (one group over
        every parameter, same order) is split into our groups."""
        groups = self.optimizer.param_groups
        if len(saved["param_groups"]) == 1 and len(groups) > 1:
            saved = _regroup(saved, [len(g["params"]) for g in groups])
        self.optimizer.load_state_dict(saved)
        configured = self.param_groups()
        for group, ours in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(name=ours["name"], lr=ours["lr"])


def _regroup(saved: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    """A one-group optimizer state dict split into consecutive groups of ``sizes``."""
    (group,) = saved["param_groups"]
    params, groups = list(group["params"]), []
    if len(params) != sum(sizes):
        raise ValueError(f"optimizer state has {len(params)} parameters, want {sum(sizes)}")
    for size in sizes:
        groups.append({**group, "params": params[:size]})
        params = params[size:]
    return {**saved, "param_groups": groups}


# ---------------------------------------------------------------------------------------
# registry

LEARNERS: dict[str, type[Learner]] = {}
L = TypeVar("L", bound=type[Learner])


def register(name: str) -> Callable[[L], L]:
    """Class decorator: make a Learner subclass buildable as ``name``."""

    def deco(cls: L) -> L:
        if LEARNERS.get(name, cls) is not cls:
            raise ValueError(f"learner name {name!r} is already taken by {LEARNERS[name]}")
        cls.name = name
        LEARNERS[name] = cls
        return cls

    return deco


@register("finetune")
class Finetune(Learner):
    """No memory: masked reconstruction + contrastive on the current batch only.

    Every clip gets its own random split, n_visible(L) tokens visible, the rest targets.
    """

    def step(self, batch: Batch) -> StepStats:
        start = time.perf_counter()
        batch = batch.to(self.device)
        idx = self.random_indices(len(batch))
        self.model.train()
        with self.autocast():
            out = self.model.mae_loss(batch.fbank, batch.frames, *idx)
        skipped, norm = self._apply(out.loss)
        return self.mae_stats(out, start, skipped, norm)


def _import_methods() -> Exception | None:
    """Import the methods module so it registers; return the error if it failed."""
    try:
        importlib.import_module(METHODS_MODULE)
    except ModuleNotFoundError as err:
        if err.name == METHODS_MODULE:
            return None  # not written yet: only the built-in learners exist
        logger.warning("could not import %s: %s", METHODS_MODULE, err)
        return err
    except Exception as err:  # a broken methods module must not stop "finetune"
        logger.warning("could not import %s: %r", METHODS_MODULE, err)
        return err
    return None


def build_learner(
    name: str,
    model_cfg: ModelConfig,
    learner_cfg: LearnerConfig | None = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Learner:
    """The learner registered as ``name``; raises ValueError naming the known ones."""
    error = _import_methods()
    if name not in LEARNERS:
        known = ", ".join(sorted(LEARNERS))
        why = f" ({METHODS_MODULE} failed to import: {error!r})" if error else ""
        raise ValueError(f"unknown learning method {name!r}; known: {known}{why}") from error
    return LEARNERS[name](model_cfg, learner_cfg, device, **kwargs)
