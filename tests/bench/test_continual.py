"""The continual benchmark end to end: the quick mode, on a cold cache, in a temp directory."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from scipy.stats import ttest_rel

from bench.continual import MULTITASK, quick_config, run_benchmark
from bench.continual.config import PAIRS
from bench.continual.metrics import average_accuracy, forgetting


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("continual")
    cfg = quick_config(
        methods=(*quick_config().methods, "no-such-method"),
        out_dir=tmp / "out",
        cache_dir=tmp / "cache",
    )
    report = run_benchmark(cfg)
    return cfg, report, tmp


@pytest.mark.timeout(240)
def test_quick_summary_has_the_protocol_figures(quick):
    cfg, report, tmp = quick
    summary = json.loads((cfg.out_dir / "summary.json").read_text())["localized"]
    held = cfg.localized.eval_per_task * cfg.localized.scene.num_tasks
    assert summary["gallery"] == held  # the union of every task's held-out set
    assert summary["chance"] == pytest.approx(100.0 / held)
    assert summary["chance_r5"] == pytest.approx(500.0 / held)
    wanted = {"er", "derpp", "flava", "flava-noimp", "flava-nocorr", MULTITASK}
    assert set(summary["methods"]) == wanted
    for m in wanted:
        assert summary["methods"][m]["seeds"] == list(cfg.seeds)
        assert 0 <= summary["methods"][m]["A"] <= 100
    assert summary["methods"][MULTITASK]["F"] is None  # one evaluation: no forgetting
    for key in ("localization_auc", "localization_auc_shuffled", "object_recall"):
        assert 0 <= summary["avm"][key] <= 1, key
    assert 0 <= summary["avm"]["matching_acc_unseen"] <= 1
    assert {f"{a}_vs_{b}" for a, b in PAIRS} == set(summary["paired"])
    assert set(summary["targets"]) >= {"F_flava <= 0.5 F_er", "localization_auc >= 0.85"}
    assert report["meta"]["missing_methods"].keys() == {"no-such-method"}


def _runs(cfg, method):
    runs = [
        json.loads((cfg.out_dir / "runs" / f"localized-{method}-s{s}.json").read_text())
        for s in cfg.seeds
    ]
    return runs


def test_each_run_has_a_t_by_t_matrix_and_its_a_and_f(quick):
    cfg, _, _ = quick
    T = cfg.localized.scene.num_tasks
    summary = json.loads((cfg.out_dir / "summary.json").read_text())["localized"]
    for method in ("er", "flava"):
        runs = _runs(cfg, method)
        for run in runs:
            R = [[res["a2v"]["r1"] for res in row["instance"]] for row in run["rows"]]
            assert np.array(R).shape == (T, T)
            assert run["summary"]["instance"]["a2v"]["A_r1"] == pytest.approx(average_accuracy(R))
            assert run["summary"]["instance"]["a2v"]["F_r1"] == pytest.approx(forgetting(R))
            assert all(row["gallery"] == summary["gallery"] for row in run["rows"])
        mean_f = np.mean([r["summary"]["instance"]["a2v"]["F_r1"] for r in runs])
        assert summary["methods"][method]["F"] == pytest.approx(mean_f)


def test_paired_p_values_are_those_of_the_per_seed_figures(quick):
    cfg, _, _ = quick
    paired = json.loads((cfg.out_dir / "summary.json").read_text())["localized"]["paired"]
    for ours, theirs in PAIRS:
        f = [
            [r["summary"]["instance"]["a2v"]["F_r1"] for r in _runs(cfg, m)] for m in (ours, theirs)
        ]
        entry = paired[f"{ours}_vs_{theirs}"]
        assert entry["mean_diff_F"] == pytest.approx(np.mean(np.subtract(*f)))
        if np.any(np.subtract(*f)) and np.std(np.subtract(*f)) > 0:
            assert entry["p_value"] == pytest.approx(ttest_rel(*f).pvalue)
        elif not np.any(np.subtract(*f)):
            assert entry["p_value"] is None


def test_multitask_matches_the_replay_methods_budget(quick):
    cfg, _, _ = quick
    T, t = cfg.localized.scene.num_tasks, cfg.train
    joint, er = _runs(cfg, MULTITASK)[0], _runs(cfg, "er")[0]
    assert joint["updates"] == er["updates"] == T * t.steps_per_task
    assert joint["clips_per_update"] == 2 * t.batch  # = current + replayed of a replay method
    assert er["clips_per_update"] + er["tasks"][-1]["replay_size"] == 2 * t.batch


def test_flava_diagnostics_and_per_seed_pretraining(quick):
    cfg, _, tmp = quick
    T = cfg.localized.scene.num_tasks
    run = _runs(cfg, "flava")[0]
    assert len(run["avm_probes"]) == T and len(run["avm_probes"][0]) == T  # after l, task k
    for probe in run["avm_probes"][-1]:
        assert 0 <= probe["auc"] <= 1 and 0 <= probe["auc_shuffled"] <= 1
        assert 0 <= probe["match_acc"] <= 1
    assert all(0 <= t["frac_excluded"] <= 1 for t in run["tasks"])
    ckpts = sorted((tmp / "cache").glob("pretrain-*.pt"))
    assert len(ckpts) == len(cfg.seeds)  # one pretraining per seed
    w = [torch.load(c, weights_only=True)["avm"] for c in ckpts]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_report_marks_the_headline_and_the_chance_level(quick):
    cfg, _, _ = quick
    table = (cfg.out_dir / "table.md").read_text()
    assert "instance-level" in table and "Secondary view, label level" in table
    chance = 100.0 / (cfg.localized.eval_per_task * cfg.localized.scene.num_tasks)
    assert re.search(rf"^\| chance \| – \| {chance:.2f} \|", table, re.M)
    for method in ("flava", "derpp", "start (pretrained)"):
        assert re.search(rf"^\| {re.escape(method)} \|", table, re.M), method
    assert "no-such-method" in table
    assert (cfg.out_dir / "r1_localized.png").stat().st_size > 0


def test_resume_reuses_runs_and_pretrainings(quick):
    cfg, _, _ = quick
    again = run_benchmark(dataclasses.replace(cfg, resume=True, methods=("er",)))
    assert again["meta"]["runs_reused"] == len(cfg.seeds)
    assert again["sequences"]["localized"]["time"]["pretrained_now"] == []


def test_a_start_file_replaces_every_seeds_pretraining(quick):
    """--start: each seed's checkpoint holds the file's weights (fp16 -> fp32), nothing is
    pretrained, and the clips already cached are reused."""
    from worker.builtin import builtin_path

    cfg, _, tmp = quick
    start = builtin_path("tiny")
    assert start is not None
    with_start = dataclasses.replace(
        cfg, start=start, methods=("er",), seeds=(0,), out_dir=tmp / "out-start"
    )
    report = run_benchmark(with_start)
    ckpts = sorted((tmp / "cache").glob("pretrain-*.pt"))
    assert len(ckpts) == len(cfg.seeds) + 1  # the seeds' own, and one from the start file
    shipped = torch.load(start, weights_only=True)["learner"]
    ckpt = torch.load(max(ckpts, key=lambda c: c.stat().st_mtime), weights_only=True)
    for name, value in shipped["model"].items():
        assert torch.equal(ckpt["model"][name], value.float()), name
    assert torch.equal(
        ckpt["avm"]["head.0.weight"], shipped["extra_modules"]["avm.head.0.weight"].float()
    )
    assert ckpt["log"]["start_file"] == str(start) and ckpt["log"]["seconds"] == 0.0
    assert report["sequences"]["localized"]["time"]["pretrained_now"] == [0]
    table = (tmp / "out-start" / "table.md").read_text()
    assert f"--start {start}" in table and "no pretraining here" in table
