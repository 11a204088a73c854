"""The window decode benchmark (bench/perf_windows.py) on a small generated upload.

No timing assertions (a shared machine): the structure, positive times, ratios from the
medians. Our decode is timed everywhere; the ffmpeg reference only where the CLI is installed.
"""

from __future__ import annotations

import json
import shutil

import pytest

from bench import perf_windows
from bench.perf_windows import (
    UploadSpec,
    add_leads,
    comparisons,
    describe_upload,
    keyframe_times,
    make_upload,
    measure_windows,
    position_starts,
    sample_starts,
    write_report,
)
from contract.windows import window_starts

SPAN = 2.56  # preset tiny
FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(
    FFMPEG is None, reason="no ffmpeg CLI (apt-get install -y ffmpeg)"
)


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    spec = UploadSpec(minutes=1 / 3, width=320, height=240, video_bit_rate=400_000)
    path = tmp_path_factory.mktemp("windows") / spec.filename()
    return make_upload(spec, path, progress=False), spec


def _measure(path, binary):
    info = describe_upload(path)
    starts = sample_starts(info["duration_s"], SPAN, 3)
    positions = position_starts(starts, info["keyframe_interval_s"])
    result = measure_windows(str(path), "tiny", starts, 2, positions, 1, binary)
    add_leads(result, info["duration_s"], keyframe_times(path))
    return result, info


def test_the_upload_is_the_one_asked_for(upload):
    path, spec = upload
    info = describe_upload(path)
    assert info["duration_s"] == pytest.approx(spec.seconds) == pytest.approx(20.0)
    assert "h264" in info["video"] and "320x240" in info["video"] and "aac" in info["audio"]
    assert info["keyframe_interval_s"] == info["keyframe_interval_max_s"] == spec.gop_s
    assert keyframe_times(path)[:3] == [0.0, 3.0, 6.0]


def test_sampled_windows_spread_over_the_upload_first_and_last_included():
    every = window_starts(3600.0, SPAN, SPAN)
    sampled = sample_starts(3600.0, SPAN, 30)
    assert len(sampled) == 30 and sampled == sorted(sampled) and set(sampled) <= set(every)
    assert (sampled[0], sampled[-1]) == (every[0], every[-1])
    assert sample_starts(20.0, SPAN, 100) == window_starts(20.0, SPAN, SPAN)


def test_the_late_window_keeps_the_first_ones_keyframe_lead():
    starts = sample_starts(3600.0, SPAN, 30)
    at = position_starts(starts, 3.0)
    assert (at["first"], at["last"]) == (starts[0], starts[-1])
    laps = (at["late"] - at["first"]) / 3.0
    assert laps == pytest.approx(round(laps)) and at["last"] - 3.0 < at["late"] <= at["last"]
    assert "late" not in position_starts(starts, None)


def test_our_decodes_are_timed_without_ffmpeg(upload, tmp_path):
    result, info = _measure(upload[0], None)
    assert result["sides"] == ["ours", "ours_t1", "ours_bytes"] and result["fallbacks"] == 0
    assert result["opens_per_decode"] >= 1 and all(t > 0 for t in result["open_s"])
    assert len(result["rows"]) == 3
    for row in result["rows"]:
        for side in result["sides"]:
            assert len(row[side]) == 2 and all(t > 0 for t in row[side])
        assert "cli" not in row and 0 < row["ours_video_s"] <= row["cli_video_s"]
    assert set(result["position"]) == {"first", "last", "late"}
    assert all(list(sides) == ["ours"] for sides in result["position"].values())
    found = comparisons(result, info)
    names = ["window-decode", "window-decode-1-thread", "window-position", "window-bytes"]
    assert [c.bench for c in found] == [f"{name} tiny" for name in names]
    assert found[0].ref is None and found[0].ratio is None and found[0].ours.median > 0
    assert found[2].ratio > 0 and found[3].ratio > 0  # ours against ours: always there
    _check_report(tmp_path, found, result, info)


@needs_ffmpeg
def test_ffmpeg_decodes_the_same_windows_and_ratios_come_from_medians(upload, tmp_path):
    result, info = _measure(upload[0], FFMPEG)
    assert result["sides"] == ["ours", "ours_t1", "ours_bytes", "cli", "cli_t1"]
    for row in result["rows"]:
        for side in ("cli", "cli_t1", "cli_rtime", "cli_t1_rtime"):
            assert len(row[side]) == 2 and all(t > 0 for t in row[side])
    assert all(set(sides) == {"ours", "cli"} for sides in result["position"].values())
    found = comparisons(result, info)
    for c in found:
        assert c.ref is not None and c.ratio == pytest.approx(c.ours.median / c.ref.median)
    assert [c.met is not None for c in found] == [True, True, False, False]
    _check_report(tmp_path, found, result, info)


def _check_report(tmp_path, found, result, info):
    meta = {"command": "test", "config": {"reps": 2}}
    raw = {"upload": info, "ffmpeg": "ffmpeg test", "presets": {"tiny": result}}
    write_report(tmp_path, found, raw, meta)
    body = json.loads((tmp_path / "windows.json").read_text())
    assert [c["bench"] for c in body["comparisons"]] == [c.bench for c in found]
    assert len(body["presets"]["tiny"]["rows"]) == 3
    text = (tmp_path / "windows.md").read_text()
    table = text.split("## Per window, preset tiny")[1]
    assert table.count("\n| ") == 1 + 3  # the header and a line per window


def test_the_benchmark_names_the_install_command_without_ffmpeg(monkeypatch, capsys):
    monkeypatch.setattr(perf_windows.shutil, "which", lambda name: None)
    assert perf_windows.main(["--minutes", "1"]) == 2
    assert "apt-get install -y ffmpeg" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="apt-get install -y ffmpeg"):
        perf_windows.ffmpeg_binary()
