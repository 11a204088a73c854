"""The continual benchmark: metric definitions on hand-made matrices, and a tiny quick run."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from bench.continual import (
    MULTITASK,
    EfficiencyConfig,
    PretrainConfig,
    SyntheticConfig,
    TrainConfig,
    average_accuracy,
    batch_order,
    forgetting,
    matrix,
    quick_config,
    run_benchmark,
    summarize,
)

# R[l][k]: row l = after task l+1, column k = task k+1 (T = 3)
R = [
    [50.0, 10.0, 20.0],
    [30.0, 60.0, 25.0],
    [20.0, 40.0, 70.0],
]


def test_average_accuracy_is_the_mean_of_the_final_row():
    assert average_accuracy(R) == pytest.approx((20 + 40 + 70) / 3)


def test_forgetting_follows_design_formula():
    # k=1: max(50-20, 30-20) = 30; k=2: max(10-40, 60-40) = 20; F = (30 + 20) / 2
    assert forgetting(R) == pytest.approx(25.0)


def test_forgetting_max_runs_over_rows_before_the_last_even_before_the_task():
    # task 2 never learnt: best earlier value comes from row 1 (before task 2), it counts
    rows = [[80.0, 30.0], [80.0, 10.0]]
    # k ranges over tasks < T only: (80 - 80) / 1
    assert forgetting(rows) == pytest.approx(0.0)
    rows = [[80.0, 30.0, 0.0], [70.0, 10.0, 0.0], [60.0, 5.0, 0.0]]
    assert forgetting(rows) == pytest.approx(((80 - 60) + (30 - 5)) / 2)


def test_forgetting_can_be_negative_and_is_nan_for_one_task():
    assert forgetting([[10.0, 0.0], [30.0, 50.0]]) == pytest.approx(-20.0)
    assert math.isnan(forgetting([[42.0]]))


def _evals(values: list[list[float]]) -> list[dict]:
    """Per-task evaluation rows in the runner's format from R@1 values (R@5 = R@1 + 10,
    R@10 = R@1 + 20, v2a = a2v / 2)."""

    def rec(x: float) -> dict[str, float]:
        r = {"r1": x, "r5": x + 10, "r10": x + 20}
        return {**r, "avg": sum(r.values()) / 3}

    return [
        {
            "label": [{"a2v": rec(x), "v2a": rec(x / 2)} for x in row],
            "instance": [{"a2v": rec(0.0), "v2a": rec(0.0)} for _ in row],
        }
        for row in values
    ]


def test_summary_reads_a_and_f_of_r1_and_avg_per_direction():
    rows = _evals(R)
    assert matrix(rows, "label", "a2v", "r1") == R
    s = summarize(rows)
    assert s["a2v"]["A_r1"] == pytest.approx(average_accuracy(R))
    assert s["a2v"]["F_r1"] == pytest.approx(25.0)
    # Avg = R@1 + 10 everywhere: A shifts by 10, F (differences) does not move
    assert s["a2v"]["A_avg"] == pytest.approx(average_accuracy(R) + 10)
    assert s["a2v"]["F_avg"] == pytest.approx(25.0)
    assert s["v2a"]["F_r1"] == pytest.approx(12.5)


def test_batch_order_covers_each_clip_once_per_epoch():
    order = batch_order(10, steps=5, batch=4, rng=np.random.default_rng(0))
    assert order.shape == (5, 4)
    flat = order.reshape(-1).tolist()
    assert sorted(flat[:10]) == list(range(10))  # first epoch: a permutation
    assert sorted(flat[10:20]) == list(range(10))


def _tiny_config(tmp_path):
    return quick_config(
        sequences=("synthetic",),
        methods=("finetune", "flava", "no-such-method", MULTITASK),
        synthetic=SyntheticConfig(
            num_tasks=2,
            classes_per_task=2,
            pretrain_classes=2,
            train_per_task=8,
            eval_per_task=6,
            pretrain_train=8,
            pretrain_eval=6,
        ),
        train=TrainConfig(steps_per_task=2, batch=4, memory_size=6, eval_chunk=6),
        pretrain=PretrainConfig(steps=2, avm_steps=2, batch=4),
        efficiency=EfficiencyConfig(warmup_steps=2, timed_steps=2),
        workers=2,
        build_workers=1,
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
    )


@pytest.mark.timeout(120)
def test_quick_run_writes_a_consistent_report(tmp_path):
    torch.set_num_threads(1)
    report = run_benchmark(_tiny_config(tmp_path))
    out = tmp_path / "out"
    for name in (
        "table.md",
        "matrices.md",
        "results.json",
        "r1_synthetic.png",
        "memory_throughput.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert report["meta"]["missing_methods"].keys() == {"no-such-method"}

    seq = json.loads((out / "results.json").read_text())["sequences"]["synthetic"]
    assert set(seq["methods"]) == {"finetune", "flava", MULTITASK}
    for method in ("finetune", "flava"):
        agg = seq["methods"][method]
        R = agg["matrices"]["label"]["a2v"]["r1"]
        assert np.array(R).shape == (2, 2)  # after each task x each task
        summary = agg["summary"]["label"]["a2v"]
        assert summary["A_r1"]["mean"] == pytest.approx(average_accuracy(R))
        assert summary["F_r1"]["mean"] == pytest.approx(forgetting(R))
        assert all(0 <= x <= 100 for row in R for x in row)
        eff = agg["efficiency"]
        assert eff["clips_per_second"]["mean"] > 0
        assert eff["peak_train_rss_mb"]["mean"] > eff["base_rss_mb"]["mean"] * 0.5
    joint = seq["methods"][MULTITASK]
    assert np.array(joint["matrices"]["label"]["a2v"]["r1"]).shape == (1, 2)
    assert joint["summary"]["label"]["a2v"]["F_r1"]["mean"] is None  # no forgetting defined
    flava_tasks = seq["methods"]["flava"]["tasks"]["0"]
    assert [t["steps"] for t in flava_tasks] == [2, 2]
    assert seq["methods"]["flava"]["avm_probes"]["0"][0][0]["match_acc"] is not None

    eff = {e["method"]: e for e in json.loads((out / "results.json").read_text())["efficiency"]}
    assert set(eff) == {"finetune", "flava"}  # multitask steps are finetune steps
    assert eff["flava"]["tokens_kept_v"] < eff["finetune"]["tokens_kept_v"]  # selection
    assert eff["flava"]["replay_memory_mb"] > 0 == eff["finetune"]["replay_memory_mb"]
    assert all(e["peak_rss_mb"] >= e["steady_rss_mb"] > 0 for e in eff.values())

    table = (out / "table.md").read_text()
    for method in ("finetune", "flava", MULTITASK, "start (pretrained)"):
        assert re.search(rf"^\| {re.escape(method)} \|", table, re.M), method
    assert "no-such-method" in table  # reported as missing, not silently dropped
