"""The demo, small: embedded Redis, API and worker processes, report printed, clean exit."""

from __future__ import annotations

from flava.demo import DemoConfig, run_demo


def test_demo_runs_end_to_end_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLAVA_REDIS_URL", raising=False)  # use the embedded Redis
    cfg = DemoConfig(segments=2, clips_per_segment=8, probes_per_segment=4, workdir=tmp_path)
    assert run_demo(cfg) == 0
    out = capsys.readouterr().out
    assert "clips learned      : 16 / 16" in out
    assert "drift and forgetting per segment" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("segment-")]
    assert [r[0] for r in rows] == ["segment-0", "segment-1"]
    assert all(r[1] == "4" for r in rows)  # every segment's probes were kept and evaluated
    assert list((tmp_path / "checkpoints").glob("ckpt-*.pt"))  # the worker checkpointed on exit
    assert "worker stopped at version" in (tmp_path / "worker.log").read_text()
