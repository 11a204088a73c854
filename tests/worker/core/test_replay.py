"""Replay baselines (worker/core/replay.py) on the tiny preset: DER++ and LUMP."""

from __future__ import annotations

import pytest
import torch

from tests.worker.core.method_fixtures import learner_for, make_batch
from worker.core.model import ModelConfig, preset
from worker.core.replay import beta_sample, pair_index


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return preset("tiny")


def test_derpp_distills_only_with_replay(cfg: ModelConfig) -> None:
    learner = learner_for("derpp", cfg)
    assert learner.step(make_batch(cfg)).loss_der == 0
    s = learner.step(make_batch(cfg, seed=1))
    want = s.loss_rec_a + s.loss_rec_v + 0.1 * s.loss_nce + 0.5 * s.loss_der
    assert s.loss_der > 0 and s.loss == pytest.approx(want, rel=1e-5)


def test_er_stores_clips_without_embeddings(cfg: ModelConfig) -> None:
    er, derpp = learner_for("er", cfg), learner_for("derpp", cfg)
    for learner in (er, derpp):
        learner.step(make_batch(cfg))
    assert set(er.memory.fields) == {"fbank", "frames"}
    assert set(derpp.memory.fields) == {"fbank", "frames", "emb_a", "emb_v"}


def test_lump_beta_draws_are_reproducible_and_u_shaped() -> None:
    draws = [beta_sample(0.5, torch.Generator().manual_seed(s)) for s in range(2000)]
    assert beta_sample(0.5, torch.Generator().manual_seed(3)) == draws[3]
    low = sum(d < 0.1 for d in draws) / len(draws)
    assert abs(low - 0.2048) < 0.04  # arcsine CDF at 0.1 = 2/pi asin(sqrt(0.1))


def test_lump_mixes_current_with_replay(cfg: ModelConfig) -> None:
    learner = learner_for("lump", cfg)
    learner.step(make_batch(cfg))
    batch = make_batch(cfg, seed=1)
    replay = learner.sample_replay(3)
    fbank, _ = learner.mixed(batch, replay)
    other = replay.items["fbank"]
    lam = (fbank - other) / (batch.fbank - other)  # one lambda for every element
    assert 0 < float(lam.median()) < 1
    torch.testing.assert_close(fbank, lam.median() * batch.fbank + (1 - lam.median()) * other)


def test_pair_index_cycles_over_fewer_replayed_clips() -> None:
    assert pair_index(5, 2, torch.device("cpu")).tolist() == [0, 1, 0, 1, 0]
