"""Published models: snapshots every K updates, the newest M kept, listed in Redis, loadable."""

from __future__ import annotations

import json

import pytest
import torch

from contract import wire
from worker.core.learner import LearnerConfig, build_learner
from worker.core.model import preset
from worker.models import ModelPublisher, PublishConfig, load_model, model_path, published_versions


@pytest.fixture(scope="module")
def learner():
    return build_learner("finetune", preset("tiny"), LearnerConfig(seed=0))


def publisher(tmp_path, client, prefix, every=2, keep=2) -> ModelPublisher:
    cfg = PublishConfig(str(tmp_path / "models"), every, keep)
    return ModelPublisher(cfg, client, wire.Keys(prefix), "finetune", "tiny")


def publish(pub: ModelPublisher, learner, version: str, step: int) -> bool:
    done = pub.maybe_publish(learner, version, step)
    pub.flush()
    return done


def test_first_update_of_a_generation_then_every_k(tmp_path, client, prefix, learner):
    pub = publisher(tmp_path, client, prefix, every=3, keep=10)
    due = [publish(pub, learner, f"1.{n}", n) for n in range(1, 9)]
    assert due == [True, False, False, True, False, False, True, False]  # 1.1, 1.4, 1.7
    assert publish(pub, learner, "2.7", 9)  # a new generation publishes at once
    assert [str(v) for v in published_versions(pub.cfg.directory)] == ["1.1", "1.4", "1.7", "2.7"]


def test_listing_card_and_pruning_to_the_newest_m(tmp_path, client, prefix, learner):
    keys = wire.Keys(prefix)
    client.set(keys.monitor, json.dumps({"drift": {"audio": 0.5}}))
    pub = publisher(tmp_path, client, prefix, every=1, keep=2)
    for n in (1, 2, 3):
        publish(pub, learner, f"1.{n}", n + 1)
    listed = {
        k.decode(): wire.ModelCard.from_json(v) for k, v in client.hgetall(keys.models).items()
    }
    assert sorted(listed) == ["1.2", "1.3"]  # 1.1 pruned: file and listing
    card = listed["1.3"]
    assert (card.generation, card.updates, card.step, card.method, card.preset) == (
        1, 3, 4, "finetune", "tiny"
    )  # fmt: skip
    assert card.monitor == {"drift": {"audio": 0.5}}  # the summary at that time
    assert not model_path(pub.cfg.directory, "1.1").exists()
    assert not list((tmp_path / "models").glob(".*.tmp"))  # written atomically, no temp left


def test_loaded_snapshot_embeds_as_the_learner_did(tmp_path, client, prefix, learner):
    pub = publisher(tmp_path, client, prefix)
    publish(pub, learner, "3.10", 12)
    loaded = load_model(pub.cfg.directory, "3.10")
    fbank = torch.randn(2, loaded.media.audio_frames, loaded.media.mel_bins)
    frames = torch.rand(
        2, loaded.media.num_frames, 3, loaded.media.frame_size, loaded.media.frame_size
    )
    with torch.no_grad():
        mine = loaded.model.embed(fbank, frames)
        theirs = learner.model.eval().embed(fbank, frames)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b)
    assert loaded.card.version == "3.10" and not loaded.model.training


def test_publishing_nothing_when_every_is_zero(tmp_path, client, prefix, learner):
    pub = publisher(tmp_path, client, prefix, every=0)
    assert not publish(pub, learner, "1.1", 1)
    assert client.hlen(wire.Keys(prefix).models) == 0
