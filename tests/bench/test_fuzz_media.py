"""The fuzzing harness (bench/fuzz_media.py) counts what it must: a child killed by a signal is
a crash, one that stops answering is a hang, an unexpected exception is an error; each such
input is saved and reproduces. The real run is the benchmark (10 minutes), not this."""

from __future__ import annotations

import os
import time

from bench.fuzz_media import Child, fuzz, seed_clips

TARGET = "tests.bench.test_fuzz_media:misbehave"


def misbehave(data: bytes) -> dict:
    """A stand-in decoder that crashes, hangs or raises on marked inputs."""
    if b"CRASH" in data:
        os.abort()
    if b"HANG" in data:
        time.sleep(30)
    if b"RAISE" in data:
        raise KeyError("raised")
    return {"probe": "ok", "decode": "ok"}


def test_crashes_are_counted_and_saved(tmp_path):
    tally = fuzz({"c": b"CRASH" * 200}, 60, tmp_path, jobs=1, target=TARGET, max_inputs=4)
    assert tally.inputs == 4 and tally.crashes >= 1
    assert tally.crashes + tally.probe["ok"] == 4
    saved = sorted((tmp_path / "crashes").iterdir())
    assert len(saved) == len({k["file"] for k in tally.kept if k["kind"] == "crash"})
    answer = Child(TARGET).run(saved[0].read_bytes(), 10.0)
    assert answer["kind"] == "crash" and answer["signal"] == 6  # SIGABRT, again


def test_hangs_and_errors_are_counted(tmp_path):
    seeds = {"h": b"HANG" * 200}
    tally = fuzz(seeds, 60, tmp_path, jobs=1, timeout_s=0.5, hang_timeout_s=1.0, target=TARGET,
                 max_inputs=1)  # fmt: skip
    assert tally.hangs == 1 and len(list((tmp_path / "hangs").iterdir())) == 1
    raised = fuzz({"r": b"RAISE" * 200}, 60, tmp_path, jobs=1, target=TARGET, max_inputs=3)
    assert raised.errors >= 1 and raised.crashes == raised.hangs == 0
    assert any("KeyError" in k["answer"]["error"] for k in raised.kept)


def test_real_seeds_go_through_the_probe_and_the_decoder(tmp_path):
    seeds = seed_clips()
    assert len(seeds) >= 20
    tally = fuzz(seeds, 60, tmp_path, jobs=1, max_inputs=40)
    assert tally.inputs == 40
    assert (
        sum(tally.probe.values()) == sum(tally.decode.values()) == 40 - tally.crashes - tally.hangs
    )
    assert tally.max_peak_rss_mb > 100  # torch and PyAV are loaded in the child
