"""bench/perf_ranks.py: a real 2-rank group steps in lockstep and its figures add up."""

from __future__ import annotations

import json

import pytest

from bench import perf_ranks
from bench.perf_ranks import GpuAssumptions, RanksConfig


def test_two_ranks_step_in_lockstep_and_report(tmp_path):
    cfg = RanksConfig(method="er", batch=2, warmup=1, steps=2, rounds=1)
    group = perf_ranks.run_group(2, cfg, tmp_path)
    assert len(group.step_s) == 2 and all(s > 0 for s in group.step_s)
    assert all(s > 0 for s in group.allreduce_s)  # the gradients went through gloo
    assert len(group.cpu_s) == 2 and all(s > 0 for s in group.cpu_s)
    alone = perf_ranks.run_group(1, cfg, tmp_path)
    assert alone.allreduce_s == [0.0, 0.0]
    result = perf_ranks.report(cfg, {1: alone, 2: group}, None)
    two = result["measured"]["2"]
    assert two["samples_per_s"] == pytest.approx(2 * 2 / two["step_s_median"])
    assert result["measured"]["1"]["scaling"] == 1.0
    text = perf_ranks.summary_markdown(json.loads(json.dumps(result)), "cmd")
    assert "| 2 |" in text and "load average" in text


def test_scaling_model_counts_the_buffer_and_bounds_efficiency(monkeypatch):
    monkeypatch.setattr(perf_ranks, "in_fresh_process", lambda fn, *a: (1_000_000, 10))
    a = GpuAssumptions(gpus=8, busbw_gb_s=100.0, hbm_gb_s=1e9, vote_s=0.0)
    m = perf_ranks.scaling_model("flava", 9, a)
    assert m["allreduce_buffer_bytes"] == 4 * (1_000_000 + 10 + 2)
    assert m["allreduce_s"] == pytest.approx(2 * 7 / 8 * 4_000_048 / 100e9)
    v100 = m["anchors"]["v100_paper"]
    assert v100["compute_s_per_step"] == pytest.approx(9 / 17.29)
    comm = m["comm_s_per_step"]
    assert v100["efficiency"] == pytest.approx(
        v100["compute_s_per_step"] / (v100["compute_s_per_step"] + comm)
    )
    assert m["anchors"]["h100_flops"]["efficiency"] < v100["efficiency"]  # faster compute
