"""One learner over N processes: the gradient all-reduce and the rank-0 broadcast.

The learners make several passes per step through model methods other than ``forward``
(FLAVA: a no-grad pass over all tokens, the AVM's loss backpropagated early, then the
backbone's), so DistributedDataParallel's forward hooks do not fit them. What DDP does for
a step is done here explicitly with torch.distributed: once every backward pass of the
step has run, each rank's gradients go into one flat buffer, one all-reduce sums it over
the group, and every rank applies the mean. Ranks start equal (``broadcast_learner`` from
rank 0, as DDP does at construction) and apply equal updates, so they stay equal.

Randomness stays per rank: each rank's generator is seeded by ``rank_seed``, so ranks draw
their own masks, replay samples and keep-sets, as the authors' code does on each GPU.
Process-group set-up and the worker's side are in worker/ranks.py (docs/distributed.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from worker.core.learner import Gradients, Learner

RANK_SEED_STRIDE = 1_000  # rank r draws from seed + 1000 r: apart from the memory's seed + 1
# the part of Learner.state_dict() every rank holds alike (rank 0's is broadcast); the rest
# (replay memory, generator, method state such as FLAVA's gate) is each rank's own
SHARED_STATE = ("model", "extra_modules", "optimizer", "step", "skipped")


def rank_seed(seed: int, rank: int) -> int:
    """The generator seed of ``rank`` (rank 0 keeps ``seed``: one rank = one process)."""
    return seed + RANK_SEED_STRIDE * rank


class AllReduceGradients(Gradients):
    """Average each step's gradients over the default process group (gloo or NCCL).

    The buffer (P + n_params + 2,) holds: every gradient flattened (zeros where a rank has
    none), a has-gradient flag per parameter, whether the rank contributes, and whether its
    loss was not finite. The sum is divided by the number of contributing ranks, so a rank
    that sits out (no clips) does not shrink the others' mean; a parameter that had a
    gradient on no rank keeps ``grad = None`` (Adam then leaves it, as in one process). A
    non-finite loss on any rank skips the step on all (one process would skip the batch)."""

    def average(self, params: list[nn.Parameter], contributes: bool, finite: bool) -> bool:
        buffer = _pack(params, contributes, finite)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        ranks, non_finite = (int(v) for v in buffer[-2:].tolist())
        if ranks == 0 or non_finite > 0:
            return False
        _unpack(params, buffer, ranks)
        return True


def _pack(params: list[nn.Parameter], contributes: bool, finite: bool = True) -> Tensor:
    """(sum numel + len(params) + 2,) float32 on the parameters' device."""
    device = params[0].device
    grads, flags = [], []
    for p in params:
        grad = p.grad if contributes and p.grad is not None else None
        grads.append((torch.zeros_like(p) if grad is None else grad).detach().reshape(-1).float())
        flags.append(float(grad is not None))
    tail = torch.tensor([*flags, float(contributes), float(not finite)], device=device)
    return torch.cat([*grads, tail])


def _unpack(params: list[nn.Parameter], buffer: Tensor, ranks: int) -> None:
    """Each parameter's mean gradient back into ``p.grad`` (None where no rank had one)."""
    flags = buffer[-2 - len(params) : -2].tolist()
    offset = 0
    for p, has in zip(params, flags, strict=True):
        n = p.numel()
        mean = buffer[offset : offset + n].view_as(p).to(p.dtype) / ranks
        p.grad = mean if has > 0 else None
        offset += n


def broadcast_learner(learner: Learner, src: int = 0) -> None:
    """Make every rank's weights, optimizer moments and update count ``src``'s.

    The replay memory and the generator stay each rank's own. Sent as one pickled object
    (``broadcast_object_list``): once per process start, not per step."""
    shared: list[Any] = [_shared_state(learner) if dist.get_rank() == src else None]
    dist.broadcast_object_list(shared, src=src, device=_object_device(learner))
    if dist.get_rank() != src:
        _load_shared_state(learner, shared[0])


def _shared_state(learner: Learner) -> dict[str, Any]:
    state = learner.state_dict()
    return {k: _to_cpu(state[k]) for k in SHARED_STATE}


def _load_shared_state(learner: Learner, shared: dict[str, Any]) -> None:
    learner.model.load_state_dict(shared["model"])
    learner.extra_modules.load_state_dict(shared["extra_modules"])
    learner.load_optimizer_state(shared["optimizer"])
    learner.step_count = int(shared["step"])
    learner.skipped_count = int(shared["skipped"])


def _to_cpu(state: Any) -> Any:
    """``state`` with every tensor detached and on the CPU (containers rebuilt)."""
    return tree_map(lambda v: v.detach().cpu() if isinstance(v, Tensor) else v, state)


def _object_device(learner: Learner) -> torch.device | None:
    """NCCL moves pickled objects through the rank's GPU; gloo through the CPU."""
    return learner.device if dist.get_backend() == "nccl" else None
