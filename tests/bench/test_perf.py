"""The performance benchmark: the quick run's report, and the pieces it is computed with.

No timing assertions: timings on a shared machine flake. The checks are on structure and on
the ratios being computed from the measured medians.
"""

from __future__ import annotations

import json
import math

import pytest

from bench.perf import PerfConfig, make_decode_clip, run_all
from bench.perf_service import batch_throughputs, padded, summarize_profile
from bench.perfkit import Comparison, Stats
from service.probe import ProbeLimits, probe_clip

BENCHES = ["decode", "step-time", "step-memory", "service", "ingest", "embed"]


def test_stats_are_percentiles_of_the_samples():
    s = Stats.of([5.0, 1.0, 3.0, 2.0, 4.0], "ms")
    assert (s.n, s.median, s.p10, s.p90) == (5, 3.0, 1.4, 4.6)
    with pytest.raises(ValueError):
        Stats.of([], "ms")


def test_ratio_and_target():
    lower = Comparison("t", "", "a", Stats.of([2.0], "ms"), "b", Stats.of([4.0], "ms"), "<= 1.0")
    assert lower.ratio == 0.5 and lower.met is True
    higher = Comparison("t", "", "a", Stats.of([2.0], "/s"), "b", Stats.of([4.0], "/s"), ">= 0.8")
    assert higher.met is False
    missing = Comparison("t", "", "a", Stats.of([2.0], "ms"), "b", None, "<= 1.0")
    assert missing.ratio is None and missing.met is None


def test_padded_clips_are_unique_valid_and_exactly_sized(tmp_path):
    base = make_decode_clip(tmp_path / "c.mp4", 1.0).read_bytes()
    a, b = padded(base, 1 << 18, 1), padded(base, 1 << 18, 2)
    assert len(a) == len(b) == 1 << 18 and a != b
    probe_clip(a, ProbeLimits())  # the trailing 'free' box keeps the file valid
    with pytest.raises(ValueError):
        padded(base, len(base) + 8, 0)


def test_batch_throughput_counts_clips_written_together():
    written = {"a": 10.0, "b": 10.0, "c": 11.0, "d": 11.0, "e": 11.0, "f": 11.5}
    assert batch_throughputs(written) == [3.0, 2.0]


def test_profile_summary_is_a_tree_under_the_focus(tmp_path):
    raw = tmp_path / "p.raw"
    raw.write_text(
        "main (m.py:1);Worker.iterate (r.py:2);Flava.step (m.py:3) 6\n"
        "main (m.py:1);Worker.iterate (r.py:2);Worker._publish (r.py:4) 2\n"
        "main (m.py:1);other (o.py:1) 5\n"
    )
    text = summarize_profile(raw, "Worker.iterate")
    assert "8 samples under Worker.iterate" in text
    assert " 75.0%  Flava.step" in text and " 25.0%  Worker._publish" in text


@pytest.mark.timeout(300)
def test_quick_run_reports_every_benchmark_with_ratios_from_medians(tmp_path):
    cfg = PerfConfig.quick_config()
    run_all(cfg, set(BENCHES) | {"step"}, tmp_path)
    body = json.loads((tmp_path / "perf.json").read_text())
    assert body["meta"]["quick"] is True
    comparisons = body["comparisons"]
    assert [c["bench"] for c in comparisons] == BENCHES
    for c in comparisons:
        ours, ref = c["ours"], c["ref"]
        assert ours["n"] >= 1 and ours["p10"] <= ours["median"] <= ours["p90"]
        if ref is None:  # only when ffmpeg is missing
            assert c["bench"] == "decode" and c["ratio"] is None
            continue
        assert c["ratio"] == pytest.approx(ours["median"] / ref["median"])
        assert math.isfinite(c["ratio"]) and c["ratio"] > 0
        if c["target"]:
            op, bound = c["target"].split()
            assert c["met"] == (
                c["ratio"] <= float(bound) if op == "<=" else c["ratio"] >= float(bound)
            )
    report = (tmp_path / "perf.md").read_text()
    for name in BENCHES:
        assert f"| {name} |" in report and f"## {name}:" in report
    assert (tmp_path / "perf.png").stat().st_size > 0
