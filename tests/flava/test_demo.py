"""The demo, small: embedded Redis, API and worker processes, report printed, clean exit."""

from __future__ import annotations

import json

from contract import wire
from flava.demo import DemoConfig, run_demo
from worker.builtin import builtin_card, builtin_path
from worker.core.flava import FlavaOptions


def test_demo_runs_end_to_end_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLAVA_REDIS_URL", raising=False)  # use the embedded Redis
    report_path = tmp_path / "report.json"
    cfg = DemoConfig(
        segments=2,
        clips_per_segment=8,
        probes_per_segment=4,
        workdir=tmp_path,
        report_json=report_path,
    )
    assert run_demo(cfg) == 0
    out = capsys.readouterr().out
    assert "clips learned      : 16 / 16" in out
    assert "drift and forgetting per segment" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("segment-")]
    monitor_rows = [r for r in rows if len(r) > 1 and r[1] == "4"]
    assert [r[0] for r in monitor_rows] == ["segment-0", "segment-1"]  # probes kept per segment
    assert list((tmp_path / "checkpoints").glob("ckpt-*.pt"))  # the worker checkpointed on exit
    assert "worker stopped at version" in (tmp_path / "worker.log").read_text()

    report = json.loads(report_path.read_text())
    assert report["clips_learned"] == 16 and report["probes"] == 8
    assert report["chance_r1"] == 100 / 8  # one own pair among every segment's probes
    assert wire.ModelVersion.parse(report["model_version"]).updates >= 2
    latency = report["learned_latency_s"]  # every clip was waited for until durable
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] < 300
    for seg in ("segment-0", "segment-1"):
        figures = report["segments"][seg]
        assert 0.0 <= figures["r1_a2v"] <= 100.0 and 0.0 <= figures["r1_v2a"] <= 100.0
        if builtin_path("tiny") is not None:  # the frozen start is scored on the same probes
            assert 0.0 <= figures["frozen_r1_a2v"] <= 100.0
    card = builtin_card("tiny")
    if card is not None:
        # the gate starts at the builtin AVM's measured accuracy on unseen tasks' scenes
        gate = FlavaOptions().warmup_acc
        opened_at_once = report["selection_on_at_update"] == 1
        assert opened_at_once is (card["avm"]["unseen_acc"] >= gate)
        assert report["avm_matching_acc_card_unseen"] == card["avm"]["unseen_acc"]
        assert 0.0 <= report["avm_matching_acc"] <= 1.0
