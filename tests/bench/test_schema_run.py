"""bench/schema_run.py in quick mode: a real flava serve and redis-server per state, a few
cases per operation; the committed run (bench/results/schema/) is the long one."""

from __future__ import annotations

from bench.schema_run import allowed, main, run_state


def test_only_server_errors_but_503_fail():
    assert allowed(200) and allowed(422) and allowed(503)
    assert not allowed(500) and not allowed(502) and not allowed(504)


def test_a_full_redis_answers_writes_with_503_and_nothing_with_another_5xx(tmp_path):
    state = run_state("maxmemory", 2, tmp_path / "run")
    assert state["failures"] == [] and state["cases"] >= 17
    assert len(state["statuses"]) == 17  # every operation of the schema
    assert state["statuses"]["POST /model/pause"][503] >= 1  # a write, refused: Redis is full
    assert state["redis_used_memory"] > 0


def test_the_summary_is_written_per_operation_and_status(tmp_path):
    assert main(["--examples", "1", "--states", "healthy", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "## Redis healthy" in summary and "`GET /models` | 200:" in summary
