"""The hardened open (contract/media_open.py) as the API's probe and the worker's decoder use it:
uploads that name other files open nothing, frames are bounded by what is decoded, cover art
is not video, and a probe's memory does not follow what an upload declares."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.probe import ProbeError, ProbeLimits, probe_clip
from tests.hostile_media import OpenWatch, cover_art_mp3, path_following, png_mov
from tests.worker.core.media_fixtures import ClipSpec, encode_clip
from worker.core.media import MediaConfig, MediaTooLarge, UndecodableMedia, decode_clip

CFG = MediaConfig(audio_frames=256, num_frames=4, frame_size=32, video_window_s=2.56)
REFUSED = [name for name in path_following("/x") if name != "dash manifest"]


@pytest.fixture
def secret(tmp_path, monkeypatch):
    """A folder holding a good clip (the canary), watched for opens; the working directory."""
    folder = tmp_path / "secret"
    folder.mkdir()
    (folder / "canary.mp4").write_bytes(encode_clip(ClipSpec(seconds=1.0)))
    monkeypatch.chdir(folder)
    watch = OpenWatch(folder)
    yield folder / "canary.mp4", watch
    watch.close()


@pytest.mark.parametrize("name", REFUSED)
def test_an_upload_naming_other_files_is_refused_and_opens_nothing(secret, tmp_path, name):
    canary, watch = secret
    data = path_following(str(canary))[name]
    upload = tmp_path / "upload.bin"  # long uploads are probed from a file
    upload.write_bytes(data)
    for source in (data, upload):
        with pytest.raises(ProbeError) as refused:
            probe_clip(source, ProbeLimits())
        assert (refused.value.code, refused.value.status) == ("refused_format", 415)
        with pytest.raises(UndecodableMedia, match="format is refused"):
            decode_clip(source, CFG)
    assert watch.events() == []
    canary.read_bytes()  # the watch sees an open when there is one
    assert "canary.mp4" in watch.events()


def test_a_dash_manifest_is_not_media_here_and_opens_nothing(secret):
    canary, watch = secret
    data = path_following(str(canary))["dash manifest"]
    with pytest.raises(ProbeError) as refused:
        probe_clip(data, ProbeLimits())
    assert refused.value.code == "undecodable"  # this FFmpeg has no DASH demuxer
    assert watch.events() == []


def test_refusals_say_nothing_about_which_files_exist(secret):
    canary, _ = secret
    reasons = set()
    for target in (str(canary), str(canary.with_name("missing.mp4"))):
        for name in ("concat list", "concat list, relative"):
            with pytest.raises(ProbeError) as refused:
                probe_clip(path_following(target)[name], ProbeLimits())
            reasons.add((refused.value.code, str(refused.value)))
    assert len(reasons) == 1, reasons


def test_a_frame_larger_than_its_header_is_refused_by_the_decoder():
    data = png_mov([(32, 32)] + [(4800, 2400)] * 4)
    assert probe_clip(data, ProbeLimits()).width == 32  # the probe decodes the first frame only
    with pytest.raises(MediaTooLarge, match="4800x2400"):
        decode_clip(data, CFG)
    decode_clip(data, MediaConfig(**{**vars(CFG), "max_pixels": 4800 * 2400}))  # under it: fine


def test_a_large_first_frame_is_refused_by_the_probe_before_it_is_decoded():
    data = png_mov([(8000, 4000)] * 3)
    with pytest.raises(ProbeError) as refused:
        probe_clip(data, ProbeLimits())
    assert refused.value.code == "resolution_too_large"
    assert "8000x4000" in str(refused.value)
    with pytest.raises(MediaTooLarge, match="8000x4000"):
        decode_clip(data, CFG)


def test_a_small_header_cannot_hide_a_large_first_frame():
    data = png_mov([(5000, 2000)] * 2)
    patched = data.replace(b"\x13\x88\x07\xd0", b"\x00\x20\x00\x20")  # stsd: 5000x2000 -> 32x32
    assert patched != data
    with pytest.raises(ProbeError) as refused:
        probe_clip(patched, ProbeLimits())
    assert refused.value.code == "resolution_too_large"


_PEAK_RSS = """
import json, sys
from pathlib import Path
from service.probe import ProbeError, ProbeLimits, probe_clip
from tests.worker.core.media_fixtures import ClipSpec, encode_clip

def kb(field):  # this process's VmRSS / VmHWM (peak since the last reset), in KB
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

probe_clip(encode_clip(ClipSpec(seconds=1.0)), ProbeLimits())  # libraries loaded, warm
Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current RSS
before = kb("VmRSS")
try:
    probe_clip(Path(sys.argv[1]), ProbeLimits())
    code = None
except ProbeError as exc:
    code = exc.code
print(json.dumps({"code": code, "grown_kb": kb("VmHWM") - before}))
"""


def test_the_probe_of_a_huge_frame_costs_little_memory(tmp_path):
    """8000x4000 PNG frames (an upload of 340 KB): decoding one takes ~96 MB; the probe refuses
    it before (was: +92 MB peak RSS)."""
    upload = tmp_path / "big.mov"
    upload.write_bytes(png_mov([(8000, 4000)] * 2))
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(upload)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
        timeout=120,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == "resolution_too_large"
    assert result["grown_kb"] < 16 * 1024, result


def test_audio_with_cover_art_is_not_video():
    data = cover_art_mp3()
    with pytest.raises(ProbeError) as refused:
        probe_clip(data, ProbeLimits())
    assert (refused.value.code, refused.value.status) == ("no_video", 422)
    assert "attached picture" in str(refused.value)


# inputs bench/fuzz_media.py found raising something other than the documented refusals
FLV_STREAM_APPEARS = Path(__file__).parents[1] / "media" / "fuzz_flv_stream_appears.flv"


def test_a_stream_without_a_decoder_is_undecodable():
    """An unknown codec tag: the stream has no codec context (was AttributeError in both)."""
    data = encode_clip(ClipSpec(seconds=1.0)).replace(b"avc1", b"zzzz")
    with pytest.raises(ProbeError) as refused:
        probe_clip(data, ProbeLimits())
    assert (refused.value.code, refused.value.status) == ("undecodable", 415)
    assert "no decoder" in str(refused.value)
    with pytest.raises(UndecodableMedia, match="no decoder for the codec of the video stream"):
        decode_clip(data, CFG)


def test_a_stream_appearing_while_demuxing_is_undecodable():
    """A mutated FLV whose header declares two streams and whose packets bring a third: PyAV
    raised IndexError from its stream container while the worker decoded it."""
    with pytest.raises(UndecodableMedia, match="a stream appeared after the header"):
        decode_clip(FLV_STREAM_APPEARS.read_bytes(), CFG)
