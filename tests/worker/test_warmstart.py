"""Warm starts from our checkpoints and from CAV-MAE-named state dicts."""

from __future__ import annotations

import pytest
import torch

from worker.core.convert import to_cav_mae_state_dict
from worker.core.learner import LearnerConfig, build_learner
from worker.core.model import preset
from worker.warmstart import warm_start

CFG = preset("tiny")


def learner(method: str, seed: int):
    return build_learner(method, CFG, LearnerConfig(seed=seed))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_from_our_checkpoint_takes_backbone_and_avm(tmp_path):
    source, target = learner("flava", 1), learner("flava", 2)
    assert not same_weights(source.model, target.model)
    torch.save({"learner": source.state_dict(), "counters": {"version": 9}}, tmp_path / "c.pt")
    result = warm_start(target, tmp_path / "c.pt")
    assert result.source == "flava-stream" and result.avm_tensors > 0
    assert same_weights(source.model, target.model)
    assert same_weights(source.extra_modules["avm"], target.extra_modules["avm"])
    assert target.step_count == 0  # counters and optimizer start fresh


def test_from_cav_mae_names(tmp_path):
    source, target = learner("finetune", 3), learner("finetune", 4)
    torch.save({"model": to_cav_mae_state_dict(source.model)}, tmp_path / "cav.pth")
    result = warm_start(target, tmp_path / "cav.pth")
    assert result.source == "cav-mae" and result.backbone_tensors > 0
    a = source.model.state_dict()["blocks_a.0.attn.qkv.weight"]
    assert torch.equal(a, target.model.state_dict()["blocks_a.0.attn.qkv.weight"])


def test_refuses_a_pickled_object(tmp_path):
    torch.save([1, 2, 3], tmp_path / "x.pt")
    with pytest.raises(ValueError, match="state dict"):
        warm_start(learner("finetune", 0), tmp_path / "x.pt")


def test_pretrained_file_with_heldout_accuracy_opens_the_gate_at_once(tmp_path):
    """A `flava pretrain` file carries its AVM's held-out accuracy: above the gate, FLAVA
    selects patches from update 1; below it, the gate starts there and stays closed."""
    from worker.core.learner import LearnerConfig, build_learner
    from worker.core.model import preset

    source = build_learner("flava", preset("tiny"), LearnerConfig(memory_size=4))
    for acc, on in ((0.9, True), (0.6, False)):
        state = {
            "learner": {
                "model": source.model.state_dict(),
                "extra_modules": source.extra_modules.state_dict(),
                "avm_heldout_acc": acc,
            }
        }
        torch.save(state, tmp_path / "pre.pt")
        learner = build_learner("flava", preset("tiny"), LearnerConfig(memory_size=4))
        warm_start(learner, tmp_path / "pre.pt")
        gate = learner.selection_state()
        assert gate.on is on and gate.avm_accuracy_ema == acc
        if on:
            assert gate.selection_step == 0  # on before the first update
