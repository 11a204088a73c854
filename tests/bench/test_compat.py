"""bench/compat.py end to end on a few real clips: the monitor's cross-version figures over a
continual run from the shipped pretrained start, paired over seeds, and resumable."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.compat import KNOWN_ARMS, CompatConfig, run
from bench.continual.sequences import LocalizedSetConfig
from worker.core.localized import LocalizedConfig


@pytest.mark.timeout(300)
def test_compat_bench_reports_ratios_per_arm_and_lag_with_paired_tests(tmp_path):
    cfg = CompatConfig(
        data=LocalizedSetConfig(
            scene=LocalizedConfig(num_tasks=2),
            train_per_task=8,
            eval_per_task=6,
            pretrain_train=2,
            pretrain_eval=2,
        ),
        steps_per_task=2,
        every=1,
        lags=(1, 3),
        arms=(KNOWN_ARMS["er"], KNOWN_ARMS["derpp"]),
        seeds=(0, 1),
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
    )
    report = run(cfg)
    summary = report["summary"]
    assert summary["chance_r1"] == pytest.approx(100 / 6)  # 1 of a window's 6 probes
    assert summary["updates_apart"] == {"1": 1, "3": 3}
    assert set(summary["arms"]) == {"er", "derpp"} and summary["arms"]["er"]["der_alpha"] is None
    for r in report["runs"]:
        assert r["updates"] == 4 and len(r["figures"]) == 2 * (4 + 2)  # windows x lag terms
        for f in r["figures"]:
            for d in ("a2v", "v2a"):
                if f["same"][d] > 0:
                    assert f["ratio"][d] == pytest.approx(f["cross"][d] / f["same"][d])
        lag1 = [f for f in r["figures"] if f["lag"] == 1]
        pooled = sum(f["cross"]["a2v"] for f in lag1) / sum(f["same"]["a2v"] for f in lag1)
        assert r["by_lag"]["1"]["a2v"]["ratio"] == pytest.approx(pooled)
    assert report["runs"][1]["mean_loss_der"] > 0 == report["runs"][0]["mean_loss_der"]
    test = summary["paired"]["derpp_vs_er"]["3"]["both"]
    ratios = {
        (r["arm"]["name"], r["seed"]): r["by_lag"]["3"]["both"]["ratio"] for r in report["runs"]
    }
    wanted = [ratios["derpp", s] - ratios["er", s] for s in (0, 1)]
    assert test["diffs"] == pytest.approx(wanted) and test["n"] == 2
    md = (cfg.out_dir / "summary.md").read_text()
    assert "| derpp_vs_er | 3 |" in md and "chance 16.67" in md
    # a second invocation with --resume reuses every run and reports the same
    again = run(dataclasses.replace(cfg, resume=True))
    assert again["summary"] == summary
    assert json.loads((cfg.out_dir / "results.json").read_text())["summary"] == summary
