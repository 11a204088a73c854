"""The decodability contract: anything the API accepts, the worker decodes (docs/media.md).

A corpus of real containers and codecs, encoded here with PyAV (Ogg/Theora is a committed
fixture: PyAV has no Theora encoder; tests/media/make_theora.py made it). Each pair goes through
the API (real Redis): it is refused with a specific code, or accepted, and then the bytes the API
stored for the worker are decoded with the worker's ``decode_clip``. A representative subset is
learned end to end by a running Worker. A pair is skipped only where this PyAV has no encoder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import av
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from contract import wire
from service.app import create_app
from service.settings import ApiSettings
from tests.worker.core.media_fixtures import ClipSpec, encode_clip
from worker.core.media import MediaConfig, decode_clip

THEORA = Path(__file__).parent / "media" / "theora_vorbis.ogv"
LEARNED = "learned"
BASE = ClipSpec(seconds=1.5)
X265 = (("x265-params", "log-level=error"),)
WEBM = {"container": "webm", "audio_codec": "libopus", "sample_rate": 48000}

# name -> (what to encode, or a committed file; the outcome: LEARNED or the API's refusal code)
CORPUS: dict[str, tuple[ClipSpec | Path, str]] = {
    "mp4 h264/aac": (BASE, LEARNED),
    "mp4 hevc/aac": (replace(BASE, video_codec="libx265", video_options=X265), LEARNED),
    "mp4 av1/aac": (replace(BASE, video_codec="libsvtav1", width=64, height=64), LEARNED),
    "mov h264/pcm_s16le": (replace(BASE, container="mov", audio_codec="pcm_s16le"), LEARNED),
    "mkv h264/vorbis": (replace(BASE, container="matroska", audio_codec="vorbis"), LEARNED),
    "mkv mpeg4/flac": (
        replace(BASE, container="matroska", video_codec="mpeg4", audio_codec="flac"),
        LEARNED,
    ),
    "webm vp8/vorbis": (
        replace(BASE, container="webm", video_codec="libvpx", audio_codec="vorbis"),
        LEARNED,
    ),
    "webm vp9/opus": (replace(BASE, video_codec="libvpx-vp9", **WEBM), LEARNED),
    "ogg theora/vorbis": (THEORA, LEARNED),
    "ogg vp8/opus": (replace(BASE, video_codec="libvpx", **(WEBM | {"container": "ogg"})), LEARNED),
    "avi mpeg4/mp3": (
        replace(BASE, container="avi", video_codec="mpeg4", audio_codec="libmp3lame"),
        LEARNED,
    ),
    # one keyframe: a seek lands where nothing decodes (was accepted, then dead-lettered)
    "mpeg-ts h264/aac": (replace(BASE, container="mpegts"), LEARNED),
    "mpeg-ts mpeg2/mp2": (
        replace(BASE, container="mpegts", video_codec="mpeg2video", audio_codec="mp2"),
        LEARNED,
    ),
    "mpeg-ps mpeg1/mp2": (
        replace(BASE, container="mpeg", video_codec="mpeg1video", audio_codec="mp2", fps=25),
        LEARNED,
    ),
    "vob mpeg2/ac3": (
        replace(BASE, container="vob", video_codec="mpeg2video", audio_codec="ac3"),
        LEARNED,
    ),
    "flv flv1/mp3": (
        replace(BASE, container="flv", video_codec="flv", audio_codec="libmp3lame"),
        LEARNED,
    ),
    "flv h264/aac, no duration": (
        replace(BASE, container="flv", container_options=(("flvflags", "no_duration_filesize"),)),
        LEARNED,
    ),
    # SWF: the header carries no duration (was refused as too_short)
    "swf flv1/mp3": (
        replace(BASE, container="swf", video_codec="flv", audio_codec="libmp3lame"),
        LEARNED,
    ),
    "3gp h263/amr_nb": (
        replace(
            BASE,
            container="3gp",
            video_codec="h263",
            audio_codec="libopencore_amrnb",
            sample_rate=8000,
            layout="mono",
            width=176,
            height=144,
        ),
        LEARNED,
    ),
    "asf wmv2/wmav2": (
        replace(
            BASE, container="asf", video_codec="wmv2", audio_codec="wmav2", audio_bit_rate=64000
        ),
        LEARNED,
    ),
    "variable frame rate (mkv)": (replace(BASE, container="matroska", vfr=True), LEARNED),
    "variable frame rate (mp4)": (replace(BASE, vfr=True), LEARNED),
    "rotation 90 (mp4 display matrix)": (replace(BASE, rotation=90), LEARNED),
    "10-bit h264": (replace(BASE, pix_fmt="yuv420p10le"), LEARNED),
    "10-bit hevc": (
        replace(BASE, video_codec="libx265", pix_fmt="yuv420p10le", video_options=X265),
        LEARNED,
    ),
    "10-bit vp9": (replace(BASE, video_codec="libvpx-vp9", pix_fmt="yuv420p10le", **WEBM), LEARNED),
    "mono 8 kHz": (replace(BASE, layout="mono", sample_rate=8000), LEARNED),
    "stereo 22.05 kHz": (replace(BASE, sample_rate=22050), LEARNED),
    "5.1 44.1 kHz": (replace(BASE, layout="5.1", sample_rate=44100), LEARNED),
    "5.1 48 kHz ac3 (mkv)": (
        replace(BASE, container="matroska", audio_codec="ac3", layout="5.1", sample_rate=48000),
        LEARNED,
    ),
    "1x1": (
        replace(
            BASE, container="matroska", video_codec="ffv1", pix_fmt="yuv444p", width=1, height=1
        ),
        "resolution_too_small",
    ),
    "4096x2160": (replace(BASE, seconds=0.3, width=4096, height=2160), LEARNED),
}
TINY = MediaConfig(audio_frames=256, frame_size=96, video_window_s=2.56)  # the tiny preset
# a window shorter than the clip: the decode seeks (the path Ogg/Theora and MPEG-TS broke)
SEEKING = MediaConfig(audio_frames=64, frame_size=32, video_window_s=0.5)
WORKER_SUBSET = ["ogg theora/vorbis", "swf flv1/mp3", "mpeg-ts h264/aac", "asf wmv2/wmav2"]


def corpus_bytes(name: str) -> bytes:
    """The pair's bytes; skips the test when this PyAV cannot encode it."""
    source, _ = CORPUS[name]
    if isinstance(source, Path):
        return source.read_bytes()
    try:
        return encode_clip(source)
    except (av.FFmpegError, ValueError) as err:  # an encoder missing or built without a mode
        pytest.skip(f"this PyAV cannot encode {name}: {err}")


@pytest.fixture
def api(redis_url, prefix):
    settings = ApiSettings(redis_url=redis_url, key_prefix=prefix)
    with TestClient(create_app(settings)) as client:
        yield client


def ingest(api: TestClient, data: bytes):
    return api.post("/ingest", content=data, headers={"Content-Type": "application/octet-stream"})


@pytest.mark.parametrize("name", list(CORPUS))
def test_pair_is_refused_with_a_code_or_decoded_by_the_worker(api, redis_url, prefix, name):
    data = corpus_bytes(name)
    outcome = CORPUS[name][1]
    r = ingest(api, data)
    if outcome != LEARNED:
        assert r.status_code == 422, r.text
        assert r.json()["detail"]["code"] == outcome
        return
    assert r.status_code == 202, r.text
    client = redis.Redis.from_url(redis_url)
    stored = client.get(wire.Keys(prefix).blob(r.json()["clip_id"]))
    client.close()
    assert stored == data
    for cfg in (TINY, SEEKING):
        clip = decode_clip(stored, cfg)
        assert clip.frames.shape == (cfg.num_frames, 3, cfg.frame_size, cfg.frame_size)
        assert clip.fbank.shape == (cfg.audio_frames, cfg.mel_bins)
        assert torch.isfinite(clip.frames).all() and torch.isfinite(clip.fbank).all()
    # TINY's span outlasts the clip: its length is known, from the header or (SWF) the decode
    source = CORPUS[name][0]
    seconds = source.seconds if isinstance(source, ClipSpec) else 2.0
    assert decode_clip(stored, TINY).duration_s == pytest.approx(seconds, abs=0.25)


def test_a_running_worker_learns_the_formats_that_used_to_break(
    api, redis_url, prefix, worker_settings
):
    """End to end: API -> Redis -> Worker; each clip ends learned, none dead-lettered."""
    from worker.runner import Worker

    ids = [ingest(api, corpus_bytes(name)).json()["clip_id"] for name in WORKER_SUBSET]
    client = redis.Redis.from_url(redis_url)
    worker = Worker(worker_settings(), client)  # checkpoints and models in the test's tmp dir
    worker.start()
    while worker.iterate() is not None:
        pass
    assert worker.settle()
    keys = wire.Keys(prefix)
    states = {
        n: client.hget(keys.clip(i), "state") for n, i in zip(WORKER_SUBSET, ids, strict=True)
    }
    assert states == dict.fromkeys(WORKER_SUBSET, b"learned")
    assert client.xlen(keys.dead) == 0
    client.close()
