"""``flava pretrain`` end to end at a tiny budget: data, both phases, weights, card, resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flava.pretrain import PretrainJob, run_pretrain
from worker.builtin import sha256_file
from worker.core.learner import LearnerConfig, build_learner
from worker.core.model import preset
from worker.warmstart import warm_start


def test_pretrain_writes_weights_and_card_and_resumes(tmp_path: Path):
    job = PretrainJob(
        train_clips=8,
        heldout_clips=4,
        unseen_per_task=2,
        steps=2,
        avm_steps=3,
        workers=1,
        out=tmp_path / "out",
        work_dir=tmp_path / "work",
    )
    assert run_pretrain(job, ["--steps", "2"]) == 0
    weights, card_path = tmp_path / "out" / "tiny.pt", tmp_path / "out" / "tiny.json"
    card = json.loads(card_path.read_text())
    assert card["sha256"] == sha256_file(weights)
    assert card["command"] == "flava pretrain --steps 2"
    assert card["pretrain"]["steps"] == 2 and card["pretrain"]["avm_steps"] == 3
    assert 0.0 <= card["avm"]["unseen_acc"] <= 1.0
    retrieval = card["backbone_retrieval"]
    assert retrieval["clips"] == 4 and retrieval["chance_r1"] == 25.0
    assert 0.0 <= retrieval["a2v"]["r1"] <= retrieval["a2v"]["r10"] == 100.0  # 4 clips: R@10 = 100
    # the worker loads it: backbone and AVM, and the gate starts at the card's unseen accuracy
    learner = build_learner("flava", preset("tiny"), LearnerConfig(memory_size=4))
    start = warm_start(learner, weights)
    assert start.backbone_tensors > 0 and start.avm_tensors > 0
    assert learner.selection_state().avm_accuracy_ema == card["avm"]["unseen_acc"]

    # a second run finds both phases done in its state: the same weights, no training again
    before = torch.load(weights, weights_only=True)["learner"]["model"]
    assert run_pretrain(job) == 0
    after = torch.load(weights, weights_only=True)["learner"]["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    (state,) = (tmp_path / "work").glob("state-*.pt")
    saved = torch.load(state, weights_only=True)
    assert saved["done"] == {"backbone": 2, "avm": 3} and len(saved["log"]["backbone_loss"]) == 2
