"""One rank of the gradient-equivalence test in test_distributed.py, launched by torchrun.

``torchrun --standalone --nproc-per-node 2 -m tests.worker.core.two_ranks OUT``: for each
method, every rank prepares its learner as ``prepared`` does (the same one-process code the
test's reference uses), takes one step on its own sub-batch with its gradients all-reduced
over gloo, and saves the averaged gradients and the updated weights to OUT/<method>-<rank>.pt.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.worker.core.method_fixtures import learner_for, make_batch
from worker.core.distributed import AllReduceGradients, broadcast_learner, rank_seed
from worker.core.learner import Batch, Learner
from worker.core.model import preset

METHODS = ("finetune", "er", "flava")
SEED = 3


def sub_batch(rank: int) -> Batch:
    return make_batch(preset("tiny"), n=3, seed=100 + rank)


def prepared(method: str, rank: int) -> Learner:
    """A learner with the group's initial weights and rank ``rank``'s own random draws and
    replay memory: a warm-up step on a batch of its own fills the memory (the warm-up's
    update is then undone, so every rank starts the compared step from equal weights)."""
    learner = learner_for(method, preset("tiny"), seed=SEED)
    initial = copy.deepcopy({k: v for k, v in learner.state_dict().items() if k != "extra"})
    learner.generator.manual_seed(rank_seed(SEED, rank))  # the injected random draws
    learner.step(make_batch(preset("tiny"), n=3, seed=200 + rank))
    learner.model.load_state_dict(initial["model"])
    learner.extra_modules.load_state_dict(initial["extra_modules"])
    learner.load_optimizer_state(initial["optimizer"])
    learner.step_count = initial["step"]
    return learner


def grads_and_weights(learner: Learner) -> dict[str, list[torch.Tensor]]:
    params = [p for g in learner.optimizer.param_groups for p in g["params"]]
    return {
        "grads": [p.grad.clone() if p.grad is not None else torch.empty(0) for p in params],
        "weights": [p.detach().clone() for p in params],
    }


def in_group(method: str, rank: int) -> Learner:
    learner = prepared(method, rank)
    learner.gradients = AllReduceGradients()
    broadcast_learner(learner)  # a no-op here (equal already): exercised as at start
    return learner


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for method in METHODS:
        learner = in_group(method, rank)
        learner.step(sub_batch(rank))
        torch.save(grads_and_weights(learner), out / f"{method}-{rank}.pt")
    # rank 1 has no clips: it sits out, and the update is rank 0's own gradient
    learner = in_group("er", rank)
    stats = learner.step(sub_batch(0)) if rank == 0 else learner.sit_out()
    torch.save({**grads_and_weights(learner), "skipped": stats.skipped}, out / f"sitout-{rank}.pt")
    # rank 1's loss is not finite: both skip the step
    learner, batch = in_group("finetune", rank), sub_batch(rank)
    batch.fbank[0, 0, 0] = float("nan") if rank == 1 else batch.fbank[0, 0, 0]
    stats = learner.step(batch)
    torch.save({**grads_and_weights(learner), "skipped": stats.skipped}, out / f"nan-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
