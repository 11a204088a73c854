"""bench/avm_study.py on a handful of real localized scenes and the shipped tiny weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import avm_study
from worker.builtin import builtin_path
from worker.core.avm import AVM, AVMConfig
from worker.core.localized import LocalizedConfig, scene_specs
from worker.core.model import preset
from worker.core.scenes import scene_set


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `flava pretrain` data file: 8 training, 4 held-out and 4 unseen-task scenes."""
    cfg, model = LocalizedConfig(), preset("tiny")

    def clips(task: int, n: int, split: str) -> dict:
        specs = scene_specs(cfg, task, n, 5, split)
        return scene_set(specs, cfg, model.media(), model.patch).state_dict()

    path = tmp_path_factory.mktemp("avm") / "data.pt"
    data = {"train": clips(-1, 8, "train"), "heldout": clips(-1, 4, "heldout")}
    torch.save({**data, "unseen": clips(1, 4, "heldout")}, path)
    return path


def test_keep_tokens_keeps_a_share_of_each_clips_own_tokens():
    ha, hv = torch.randn(3, 10, 4), torch.randn(3, 12, 4)
    ka, kv = avm_study.keep_tokens(ha, hv, 0.5, torch.Generator().manual_seed(0))
    assert ka.shape == (3, 5, 4) and kv.shape == (3, 6, 4)
    for clip in range(3):  # every kept row is a distinct row of the same clip
        rows = {tuple(r.tolist()) for r in ha[clip]}
        assert {tuple(r.tolist()) for r in ka[clip]} <= rows
        assert len({tuple(r.tolist()) for r in ka[clip]}) == 5
    assert avm_study.keep_tokens(ha, hv, 1.0, torch.Generator())[0] is ha


def test_sharp_avm_with_factor_one_is_the_avm():
    torch.manual_seed(0)
    plain = AVM(AVMConfig(dim=16, heads=2, head_dim=8))
    sharp = avm_study.SharpAVM(plain.cfg)
    sharp.load_state_dict(plain.state_dict())
    za, zv = torch.randn(4, 6, 16), torch.randn(4, 9, 16)
    proj = plain.project(za, zv)
    sharp.factor = 1.0
    assert torch.allclose(sharp.match_logit(proj.a, proj.v), plain.match_logit(proj.a, proj.v))
    sharp.factor = 4.0
    assert not torch.allclose(sharp.match_logit(proj.a, proj.v), plain.match_logit(proj.a, proj.v))


def test_variants_train_and_report_their_curves(data_file: Path, tmp_path: Path):
    weights = builtin_path("tiny")
    assert weights is not None
    argv = ["--data", str(data_file), "--weights", str(weights), "--out", str(tmp_path)]
    assert avm_study.main([*argv, "--steps", "4", "--eval-every", "2", "--draws", "1"]) == 0
    for name in avm_study.VARIANTS:
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [r["updates"] for r in rows] == [2, 4]
        for row in rows:
            assert 0.0 <= row["held_acc"] <= 1.0 and 0.0 <= row["unseen_acc"] <= 1.0
            assert 0.0 <= row["unseen_auc"] <= 1.0
        assert (tmp_path / f"{name}-avm.pt").stat().st_size > 0
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 2 * len(avm_study.VARIANTS)  # header + a row per evaluation


def test_ablation_of_the_shipped_avm(data_file: Path, tmp_path: Path):
    weights = builtin_path("tiny")
    assert weights is not None
    argv = ["--data", str(data_file), "--weights", str(weights), "--out", str(tmp_path)]
    assert avm_study.main([*argv, "--ablate"]) == 0
    rows = json.loads((tmp_path / "ablation.json").read_text())
    for split in ("held", "unseen"):
        assert set(rows[split]) == {*avm_study.ABLATIONS, "deranged"}
        for figures in rows[split].values():
            assert 0.0 <= figures["p_match"] <= 1.0
            assert figures["judged_match"] in {k / 4 for k in range(5)}  # 4 clips per split
