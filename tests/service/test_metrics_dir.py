"""service/metrics_dir.py: where `flava serve --workers N` keeps its processes' metric files."""

from __future__ import annotations

import os
from pathlib import Path

from service.metrics_dir import VARIABLE, metrics_dir


def test_one_worker_without_a_directory_keeps_the_process_registry(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    with metrics_dir(1) as path:
        assert path is None and VARIABLE not in os.environ


def test_several_workers_get_a_temporary_directory_removed_on_exit(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    with metrics_dir(3) as path:
        assert path is not None and os.environ[VARIABLE] == path and Path(path).is_dir()
        (Path(path) / "counter_12.db").write_bytes(b"x")
    assert not Path(path).exists() and VARIABLE not in os.environ


def test_a_given_directory_is_created_and_emptied_of_an_earlier_runs_files(monkeypatch, tmp_path):
    given = tmp_path / "prom"
    monkeypatch.setenv(VARIABLE, str(given))
    with metrics_dir(1) as path:  # given: used with one worker too
        assert path == str(given) and given.is_dir()
    (given / "counter_7.db").write_bytes(b"x")
    (given / "gauge_livemostrecent_7.db").write_bytes(b"x")
    (given / "README").write_text("not ours")
    with metrics_dir(2):
        assert sorted(p.name for p in given.iterdir()) == ["README"]
    assert given.is_dir() and os.environ[VARIABLE] == str(given)  # left for the operator
