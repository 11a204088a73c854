"""The learner seam: registry, Finetune steps, skipped steps, checkpoints, embeddings."""

from __future__ import annotations

import ast
import io
import math
from pathlib import Path

import pytest
import torch

from worker.core.learner import (
    LEARNERS,
    Batch,
    Finetune,
    Learner,
    LearnerConfig,
    StepStats,
    build_learner,
    register,
)
from worker.core.model import ModelConfig, preset


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return preset("tiny")


def make_batch(cfg: ModelConfig, n: int = 2, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        fbank=torch.randn(n, cfg.audio_frames, cfg.mel_bins, generator=g),
        frames=torch.randn(n, cfg.num_frames, 3, cfg.frame_size, cfg.frame_size, generator=g),
        ids=[f"clip{i}" for i in range(n)],
        labels=torch.arange(n),
    )


def params(learner: Learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- batch and registry -------------------------------------------------------------------


def test_batch_checks_sizes_and_moves(cfg: ModelConfig) -> None:
    batch = make_batch(cfg, 2)
    assert len(batch) == 2 and batch.to("cpu").ids == batch.ids
    with pytest.raises(ValueError, match="batch size"):
        Batch(batch.fbank, batch.frames, ids=["only-one"])


def test_build_learner_knows_finetune_and_names_the_known(cfg: ModelConfig) -> None:
    assert isinstance(build_learner("finetune", cfg, LearnerConfig()), Finetune)
    with pytest.raises(ValueError, match="finetune"):
        build_learner("no-such-method", cfg)


def test_register_makes_a_method_buildable(cfg: ModelConfig) -> None:
    @register("test-only")
    class Dummy(Finetune):
        pass

    try:
        learner = build_learner("test-only", cfg)
        assert isinstance(learner, Dummy) and learner.name == "test-only"
        with pytest.raises(ValueError, match="already taken"):
            register("test-only")(Finetune)
    finally:
        LEARNERS.pop("test-only")


# -- steps --------------------------------------------------------------------------------


def test_finetune_step_updates_and_reports(cfg: ModelConfig) -> None:
    learner = build_learner("finetune", cfg)
    before = params(learner)
    stats = learner.step(make_batch(cfg))
    assert isinstance(stats, StepStats) and not stats.skipped
    assert math.isfinite(stats.loss) and stats.loss > 0 and stats.grad_norm > 0
    assert stats.step == 1 and stats.batch_size == 2
    assert (stats.tokens_kept_a, stats.tokens_visible_a) == (128, 25)
    assert stats.loss == pytest.approx(stats.loss_rec_a + stats.loss_rec_v + 0.1 * stats.loss_nce)
    assert not same(before, params(learner))
    assert set(stats.as_dict()) >= {"loss", "loss_avm", "memory_bytes", "skipped"}


def test_seeded_steps_repeat_exactly(cfg: ModelConfig) -> None:
    runs = []
    for _ in range(2):
        learner = build_learner("finetune", cfg, LearnerConfig(seed=7))
        losses = [learner.step(make_batch(cfg, seed=s)).loss for s in range(2)]
        runs.append((losses, params(learner)))
    assert runs[0][0] == runs[1][0]
    assert same(runs[0][1], runs[1][1])
    other = build_learner("finetune", cfg, LearnerConfig(seed=8))
    assert not same(runs[0][1], params(other))


def test_non_finite_loss_skips_the_update(cfg: ModelConfig) -> None:
    learner = build_learner("finetune", cfg)
    learner.step(make_batch(cfg))  # optimizer state exists from here on
    before = params(learner)
    moments = [s["exp_avg"].clone() for s in learner.optimizer.state.values()]
    bad = make_batch(cfg)
    bad.fbank[0, 0, 0] = float("nan")
    stats = learner.step(bad)
    assert stats.skipped and stats.step == 1 and learner.skipped_count == 1
    assert same(before, params(learner))
    assert same(moments, [s["exp_avg"] for s in learner.optimizer.state.values()])
    assert not learner.step(make_batch(cfg)).skipped


def test_apply_skips_an_infinite_loss(cfg: ModelConfig) -> None:
    learner = build_learner("finetune", cfg)
    before = params(learner)
    loss = sum(p.sum() for p in learner.model.parameters()) * float("inf")
    skipped, _ = learner._apply(loss)
    assert skipped and same(before, params(learner))
    assert all(p.grad is None for p in learner.model.parameters())


def test_tiny_step_on_a_batch_of_eight(cfg: ModelConfig) -> None:
    """The benchmark-sized step runs; its time is measured in bench/, not asserted here."""
    learner = build_learner("finetune", cfg)
    stats = learner.step(make_batch(cfg, 8))
    assert not stats.skipped and stats.batch_size == 8 and stats.step_seconds > 0


# -- serving and checkpoints --------------------------------------------------------------


def test_embed_is_deterministic_and_gradient_free(cfg: ModelConfig) -> None:
    learner = build_learner("finetune", cfg)
    batch = make_batch(cfg, 3)
    emb_a, emb_v = learner.embed(batch)
    assert emb_a.shape == (3, cfg.dim) and emb_v.dtype == torch.float32
    assert not emb_a.requires_grad and learner.model.training
    with torch.no_grad():
        want = learner.model.embed(batch.fbank, batch.frames)
    assert torch.equal(emb_a, want[0]) and torch.equal(emb_v, learner.embed(batch)[1])


def test_state_dict_round_trip_resumes_exactly(cfg: ModelConfig) -> None:
    first = build_learner("finetune", cfg, LearnerConfig(seed=1))
    for s in range(2):
        first.step(make_batch(cfg, seed=s))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = build_learner("finetune", cfg, LearnerConfig(seed=2))
    second.load_state_dict(torch.load(buf, weights_only=True))
    assert second.step_count == 2 and same(params(first), params(second))
    a, b = first.step(make_batch(cfg, seed=9)), second.step(make_batch(cfg, seed=9))
    assert a.loss == b.loss and same(params(first), params(second))


def test_checkpoint_of_another_method_loads_the_backbone_only(cfg: ModelConfig) -> None:
    @register("test-other")
    class Other(Finetune):
        pass

    try:
        source = build_learner("finetune", cfg, LearnerConfig(seed=3))
        source.step(make_batch(cfg))
        target = build_learner("test-other", cfg)
        target.load_state_dict(source.state_dict())
        assert same(params(source), params(target)) and target.optimizer.state == {}
    finally:
        LEARNERS.pop("test-other")


# -- the worker's interface ---------------------------------------------------------------


def test_base_learner_makes_no_step_embeddings_and_has_no_selection_gate(cfg: ModelConfig) -> None:
    learner = build_learner("finetune", cfg, LearnerConfig(lr=2e-4))
    learner.step(make_batch(cfg))
    assert learner.take_step_embeddings() is None and learner.selection_state() is None
    assert [(g["name"], g["lr"]) for g in learner.optimizer.param_groups] == [("backbone", 2e-4)]


def test_the_worker_knows_methods_only_through_the_learner_interface() -> None:
    """worker/runner.py imports no method module and probes no learner attribute."""
    source = Path(__file__).parents[3] / "worker" / "runner.py"
    tree = ast.parse(source.read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"worker.core.methods", "worker.core.flava", "worker.core.replay"}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not {"Flava", "hasattr"} & names
    probes = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Name)
        and n.func.id in ("getattr", "isinstance")
        and "learner" in ast.unparse(n.args[0])
    ]
    assert probes == []
