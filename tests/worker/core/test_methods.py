"""Every continual method on the tiny preset: registered, steps finite, memory fills."""

from __future__ import annotations

import math

import pytest
import torch

from tests.worker.core.method_fixtures import changed, learner_for, make_batch, snapshot
from worker.core import methods
from worker.core.learner import LEARNERS
from worker.core.model import ModelConfig, preset

METHODS = ["er", "derpp", "lump", "flava", "flava+", "flava-noimp", "flava-nocorr"]


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return preset("tiny")


def test_importing_methods_registers_every_method() -> None:
    assert set(METHODS) <= set(LEARNERS)
    assert LEARNERS["flava"] is methods.Flava and LEARNERS["er"] is methods.ExperienceReplay


@pytest.mark.parametrize("name", METHODS)
def test_steps_are_finite_update_and_fill_memory(name: str, cfg: ModelConfig) -> None:
    learner = learner_for(name, cfg)
    for seed in range(2):
        before = snapshot(learner.model)
        stats = learner.step(make_batch(cfg, seed=seed))
        assert math.isfinite(stats.loss) and not stats.skipped and stats.grad_norm > 0
        assert changed(before, learner.model)
        assert stats.batch_size == 3 and stats.memory_fill == 3 * (seed + 1)
        assert stats.replay_size == (3 if seed else 0)
    assert stats.memory_bytes == learner.memory.nbytes() > 0


@pytest.mark.parametrize("name", [m for m in METHODS if m.startswith("flava")])
def test_flava_variants_replay_and_distill_with_the_gate_closed(
    name: str, cfg: ModelConfig
) -> None:
    learner = learner_for(name, cfg, warmup_acc=0.99)
    learner.step(make_batch(cfg))
    stats = learner.step(make_batch(cfg, seed=1))
    assert not stats.selection and stats.replay_size == 3 and stats.loss_der > 0
    assert torch.isfinite(torch.tensor(stats.loss))
