"""Two ranks over gloo take the step one process takes on the mean of their two losses.

torchrun launches tests/worker/core/two_ranks.py (2 ranks, 1 torch thread each); each rank
steps on its own sub-batch with its own random draws and replay memory, and its gradients
are all-reduced. The reference, in this process, runs the same learners alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.worker.core import two_ranks
from worker.core.distributed import _pack, _unpack, rank_seed
from worker.core.learner import Learner

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory) -> Path:
    """What each rank saved: OUT/<method>-<rank>.pt."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [*TORCHRUN, "-m", "tests.worker.core.two_ranks", str(out)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def params_of(learner: Learner) -> list[torch.nn.Parameter]:
    return [p for g in learner.optimizer.param_groups for p in g["params"]]


def alone(method: str, rank: int) -> list[torch.Tensor | None]:
    """Rank ``rank``'s gradients, computed by one process with no group."""
    learner = two_ranks.prepared(method, rank)
    learner.step(two_ranks.sub_batch(rank))
    return [p.grad for p in params_of(learner)]


def mean_of(first: list[torch.Tensor | None], second: list[torch.Tensor | None]) -> list:
    """Gradient of the mean of two losses: (g0 + g1) / 2, None where neither had one."""
    means: list[torch.Tensor | None] = []
    for a, b in zip(first, second, strict=True):
        if a is None and b is None:
            means.append(None)
            continue
        zero = torch.zeros_like(a if a is not None else b)
        means.append(((a if a is not None else zero) + (b if b is not None else zero)) / 2)
    return means


def saved(out: Path, method: str, rank: int) -> dict[str, list[torch.Tensor]]:
    return torch.load(out / f"{method}-{rank}.pt", weights_only=True)


@pytest.mark.parametrize("method", two_ranks.METHODS)
def test_two_ranks_average_to_the_gradient_of_the_mean_loss(ranks_out, method):
    torch.set_num_threads(1)
    reference = mean_of(alone(method, 0), alone(method, 1))
    for rank in (0, 1):
        got = saved(ranks_out, method, rank)["grads"]
        assert len(got) == len(reference)
        for g, want in zip(got, reference, strict=True):
            if want is None:
                assert g.numel() == 0
            else:
                torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", two_ranks.METHODS)
def test_both_ranks_hold_the_one_process_update(ranks_out, method):
    """Equal weights on both ranks, and equal to applying the mean gradient in one process."""
    torch.set_num_threads(1)
    first, second = saved(ranks_out, method, 0), saved(ranks_out, method, 1)
    for a, b in zip(first["weights"], second["weights"], strict=True):
        assert torch.equal(a, b)
    learner = two_ranks.prepared(method, 0)
    for p, g in zip(params_of(learner), mean_of(alone(method, 0), alone(method, 1)), strict=True):
        p.grad = g
    learner.optimizer.step()
    moved = 0
    for p, got in zip(params_of(learner), first["weights"], strict=True):
        torch.testing.assert_close(got, p.detach(), rtol=1e-4, atol=2e-6)
        moved += int(p.grad is not None)
    assert moved > 0


def test_finetune_ranks_equal_one_backward_of_the_mean_loss(ranks_out):
    """Literally: one graph, loss = (L(sub-batch 0) + L(sub-batch 1)) / 2, each with the
    masks its rank drew."""
    torch.set_num_threads(1)
    learners = [two_ranks.prepared("finetune", r) for r in (0, 1)]
    model = learners[0].model
    model.zero_grad(set_to_none=True)  # the warm-up step's gradients
    losses = []
    for rank, learner in enumerate(learners):
        batch = two_ranks.sub_batch(rank)
        idx = learner.random_indices(len(batch))  # rank ``rank``'s draws
        losses.append(model.mae_loss(batch.fbank, batch.frames, *idx).loss)
    ((losses[0] + losses[1]) / 2).backward()
    got = saved(ranks_out, "finetune", 0)["grads"]
    for p, g in zip(params_of(learners[0]), got, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_a_rank_without_clips_sits_out_and_applies_the_others_update(ranks_out):
    torch.set_num_threads(1)
    first, second = saved(ranks_out, "sitout", 0), saved(ranks_out, "sitout", 1)
    assert not first["skipped"] and not second["skipped"]
    for got, want in zip(second["grads"], alone("er", 0), strict=True):
        if want is None:
            assert got.numel() == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    for a, b in zip(first["weights"], second["weights"], strict=True):
        assert torch.equal(a, b)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_both(ranks_out):
    torch.set_num_threads(1)
    first, second = saved(ranks_out, "nan", 0), saved(ranks_out, "nan", 1)
    assert first["skipped"] and second["skipped"]
    start = [p.detach() for p in params_of(two_ranks.prepared("finetune", 0))]
    for rank in (first, second):
        for got, want in zip(rank["weights"], start, strict=True):
            assert torch.equal(got, want)


def test_a_rank_that_sits_out_does_not_shrink_the_mean():
    """The buffer's arithmetic, one process playing two ranks: sum of two packs, then
    unpack divides by the contributing ranks only; a gradient no rank had stays None."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([2.0, 4.0, 6.0])
    contributing = _pack([a, b], contributes=True)
    a.grad = torch.tensor([100.0, 100.0, 100.0])  # a rank that sits out: ignored
    sitting_out = _pack([a, b], contributes=False)
    total = contributing + sitting_out
    _unpack([a, b], total, ranks=int(total[-2]))
    assert torch.equal(a.grad, torch.tensor([2.0, 4.0, 6.0]))
    assert b.grad is None
    assert total[-1] == 0  # no rank's loss was non-finite
    assert _pack([a, b], contributes=False, finite=False)[-1] == 1


def test_rank_seeds_differ_and_rank_zero_keeps_the_seed():
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8
