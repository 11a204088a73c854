"""A corpus of hostile and broken uploads: each gets a specific 4xx and leaves no trace.

Uploads that pass the API's cheap probe but break later (corrupt packets mid-file) must be
learned or dead-lettered by the worker, which keeps going.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from contract import wire
from service.app import create_app
from service.settings import ApiSettings
from tests.hostile_media import cover_art_mp3, path_following, png_mov
from tests.worker.core.media_fixtures import ClipSpec, encode_clip

MP4 = {"Content-Type": "video/mp4"}
FORM = {"Content-Type": "multipart/form-data; boundary=xyz"}
NAMED = path_following(__file__)  # uploads naming this file: none may open it


def _form(data: bytes, part_type: str = "video/mp4", task: bytes | None = None) -> bytes:
    """A multipart body with a `file` part of ``part_type`` and an optional `task` field."""
    field = b""
    if task is not None:
        field = b'--xyz\r\nContent-Disposition: form-data; name="task"\r\n\r\n' + task + b"\r\n"
    head = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n'
        b"Content-Type: " + part_type.encode() + b"\r\n\r\n"
    )
    return field + head + data + b"\r\n--xyz--\r\n"


def _image(fmt: str, codec: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec)
        s.width, s.height = 32, 32
        s.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 90, np.uint8), format="rgb24")
        c.mux(s.encode(frame.reformat(format=s.pix_fmt)))
        c.mux(s.encode(None))
    return buf.getvalue()


def _many_streams(n_audio: int) -> bytes:
    """An MKV with a video stream and ``n_audio`` audio streams."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        v = c.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        audios = [c.add_stream("flac", rate=8000) for _ in range(n_audio)]
        img = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        for i in range(5):
            img.pts = i
            c.mux(v.encode(img.reformat(format="yuv420p")))
        for a in audios:
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.int16), "s16", "mono")
            frame.sample_rate, frame.pts = 8000, 0
            c.mux(a.encode(frame))
            c.mux(a.encode(None))
        c.mux(v.encode(None))
    return buf.getvalue()


def _sparse_video(width: int, height: int, last_pts_s: float) -> bytes:
    """mpeg4 + aac with two video frames ``last_pts_s`` apart: size and duration headers."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        v = c.add_stream("mpeg4", rate=1)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.codec_context.time_base = Fraction(1, 1)
        a = c.add_stream("aac", rate=16000)
        img = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        for pts in (0, int(last_pts_s)):
            frame = img.reformat(format="yuv420p")
            frame.pts = pts
            c.mux(v.encode(frame))
        c.mux(v.encode(None))
        _write_silence(c, a, 1.0)
    return buf.getvalue()


def _write_silence(container, stream, seconds: float) -> None:
    fmt = stream.format.name
    n = stream.codec_context.frame_size or 1024
    for start in range(0, int(seconds * 16000), n):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), fmt, "mono")
        frame.sample_rate, frame.pts = 16000, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _zero_second() -> bytes:
    """A container with both streams declared and no media in them."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        v = c.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        c.add_stream("aac", rate=16000)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good() -> bytes:
    return encode_clip(ClipSpec(seconds=1.0))


# (name, body builder, headers, expected status, expected code)
CORPUS = [
    ("zero bytes", lambda g: b"", MP4, 400, "empty_body"),
    ("random bytes", lambda g: os.urandom(4096), MP4, 415, "undecodable"),
    ("plain text as mp4", lambda g: b"hello, I am not a video\n" * 50, MP4, 415, "undecodable"),
    (
        "text content type",
        lambda g: g,
        {"Content-Type": "text/plain"},
        415,
        "unsupported_content_type",
    ),
    (
        "json content type",
        lambda g: g,
        {"Content-Type": "application/json"},
        415,
        "unsupported_content_type",
    ),
    ("zip archive", lambda g: b"PK\x03\x04" + os.urandom(2000), MP4, 415, "undecodable"),
    ("png image", lambda g: _image("image2pipe", "png"), MP4, 422, "no_audio"),
    ("jpeg image", lambda g: _image("image2pipe", "mjpeg"), MP4, 422, "no_audio"),
    (
        "audio-only mp4",
        lambda g: encode_clip(ClipSpec(seconds=1.0, video_codec=None)),
        MP4,
        422,
        "no_video",
    ),
    (
        "audio-only wav",
        lambda g: encode_clip(
            ClipSpec(container="wav", video_codec=None, audio_codec="pcm_s16le", seconds=1.0)
        ),
        {"Content-Type": "audio/wav"},
        422,
        "no_video",
    ),
    (
        "video-only mp4",
        lambda g: encode_clip(ClipSpec(seconds=1.0, audio_codec=None)),
        MP4,
        422,
        "no_audio",
    ),
    (
        "video-only webm",
        lambda g: encode_clip(
            ClipSpec(container="webm", video_codec="libvpx-vp9", audio_codec=None, seconds=1.0)
        ),
        {"Content-Type": "video/webm"},
        422,
        "no_audio",
    ),
    ("zero-second clip (muxed to no bytes)", lambda g: _zero_second(), MP4, 400, "empty_body"),
    ("truncated to a third", lambda g: g[: len(g) // 3], MP4, 415, "undecodable"),
    ("only the first 64 bytes", lambda g: g[:64], MP4, 415, "undecodable"),
    (
        "huge resolution header",
        lambda g: _sparse_video(5000, 16, 1),
        MP4,
        422,
        "resolution_too_large",
    ),
    ("very long duration", lambda g: _sparse_video(32, 32, 4 * 3600), MP4, 422, "too_long"),
    ("dozens of streams", lambda g: _many_streams(30), MP4, 422, "too_many_streams"),
    ("over-size body", lambda g: g + b"\x00" * 300_000, MP4, 413, "too_large"),
    (
        "multipart without file",
        lambda g: b'--xyz\r\nContent-Disposition: form-data; name="task"\r\n\r\nt1\r\n--xyz--\r\n',
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        422,
        "no_file",
    ),
    (
        "multipart with empty file",
        lambda g: (
            b"--xyz\r\nContent-Disposition: form-data; "
            b'name="file"; filename="a.mp4"\r\nContent-Type: video/mp4\r\n\r\n\r\n--xyz--\r\n'
        ),
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        400,
        "empty_body",
    ),
    (
        "multipart garbage",
        lambda g: b"--nope\r\n\x00\x01garbage",
        FORM,
        400,
        "bad_multipart",
    ),
    # uploads that name other files (contract/media_open.py): refused, nothing opened
    *[
        (f"{name} naming a local file", lambda g, n=name: NAMED[n], MP4, 415, "refused_format")
        for name in NAMED
        if name != "dash manifest"
    ],
    (
        "dash manifest (no DASH demuxer here)",
        lambda g: NAMED["dash manifest"],
        MP4,
        415,
        "undecodable",
    ),
    (
        "concat list in a multipart file part",
        lambda g: _form(NAMED["concat list"]),
        FORM,
        415,
        "refused_format",
    ),
    # frames larger than the header says, or than the limit
    (
        "png frames of 8000x4000",
        lambda g: png_mov([(8000, 4000)] * 2),
        MP4,
        422,
        "resolution_too_large",
    ),
    (
        "32x32 header, 5000x2000 frames",
        lambda g: png_mov([(5000, 2000)] * 2).replace(b"\x13\x88\x07\xd0", b"\x00\x20\x00\x20"),
        MP4,
        422,
        "resolution_too_large",
    ),
    (
        "8x8 video",
        lambda g: encode_clip(ClipSpec(seconds=1.0, width=8, height=8, video_codec="mpeg4")),
        MP4,
        422,
        "resolution_too_small",
    ),
    (
        "mp3 with cover art only",
        lambda g: cover_art_mp3(),
        {"Content-Type": "audio/mpeg"},
        422,
        "no_video",
    ),
    # multipart: the task and the file part are checked as the query and a raw body are
    (
        "multipart task ending in a newline",
        lambda g: _form(g, task=b"seg-1\n"),
        FORM,
        422,
        "bad_task",
    ),
    ("multipart task with a space", lambda g: _form(g, task=b"a b"), FORM, 422, "bad_task"),
    (
        "multipart file part text/plain",
        lambda g: _form(g, "text/plain"),
        FORM,
        415,
        "unsupported_content_type",
    ),
    (
        "multipart file part text/html",
        lambda g: _form(g, "text/html"),
        FORM,
        415,
        "unsupported_content_type",
    ),
    (
        "multipart over the body limit",
        lambda g: _form(g + b"\x00" * 300_000),
        FORM,
        413,
        "too_large",
    ),
    (
        "multipart without a boundary",
        lambda g: _form(g),
        {"Content-Type": "multipart/form-data"},
        400,
        "bad_multipart",
    ),
    (
        "html page as mp4",
        lambda g: b"<!doctype html><html><body>hi</body></html>" * 20,
        MP4,
        415,
        "undecodable",
    ),
    ("ffmetadata text (no streams)", lambda g: b";FFMETADATA1\ntitle=x\n", MP4, 422, "no_video"),
    # an unknown codec tag leaves the video stream without a decoder (found by
    # bench/fuzz_media.py: answered 500, the probe read the size of a missing codec context)
    ("video codec with no decoder", lambda g: g.replace(b"avc1", b"zzzz"), MP4, 415, "undecodable"),
]


@pytest.fixture
def api(redis_url, prefix, blob_dir):
    settings = ApiSettings(
        redis_url=redis_url,
        key_prefix=prefix,
        max_body_bytes=250_000,
        max_upload_bytes=250_000,
        blob_dir=str(blob_dir),
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def blob_dir(tmp_path):
    return tmp_path / "blobs"


@pytest.mark.parametrize(
    ("name", "build", "headers", "status", "code"), CORPUS, ids=[c[0] for c in CORPUS]
)
def test_hostile_upload_is_refused_without_trace(
    api, good, redis_url, prefix, blob_dir, name, build, headers, status, code
):
    r = api.post("/ingest", content=build(good), headers=headers)
    assert (r.status_code, r.json()["detail"]["code"]) == (status, code), r.text
    assert r.json()["detail"]["reason"]
    client = redis.Redis.from_url(redis_url)
    assert client.xlen(wire.Keys(prefix).stream) == 0
    assert list(client.scan_iter(f"{prefix}:*")) == []  # no blob, clip, backlog or upload
    client.close()
    assert not blob_dir.exists() or list(blob_dir.iterdir()) == []  # no file, partial or whole


def test_the_corpus_is_forty_strong():
    assert len(CORPUS) >= 40


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"task": "x" * 65}, "task"),
        ({"task": "a b"}, "task"),
        ({"task": "seg-1\n"}, "task"),
        ({"purpose": "steal"}, "purpose"),
    ],
)
def test_bad_query_parameters_are_422(api, good, params, field):
    r = api.post("/ingest", content=good, headers=MP4, params=params)
    assert r.status_code == 422
    assert field in r.text


def _corrupt_middle(data: bytes, seed: int = 3) -> bytes:
    """Overwrite 2 KB in the middle of the file with noise: headers intact, packets broken."""
    rng = np.random.default_rng(seed)
    mid = len(data) // 2
    noise = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    return data[:mid] + noise + data[mid + 2048 :]


def test_corrupt_packets_mid_file_are_learned_or_dead_lettered(
    api, redis_url, prefix, worker_settings
):
    """What passes the cheap probe but breaks in the worker never stops the worker."""
    from tests.queueing import enqueue
    from worker.core.synthetic import StreamConfig, make_clip, segment_specs
    from worker.runner import Worker

    cfg = StreamConfig(num_segments=1)
    clips = [make_clip(s, cfg) for s in segment_specs(cfg, 0, 3, seed=5)]
    r = api.post("/ingest", content=_corrupt_middle(clips[0]), headers=MP4)
    assert r.status_code in (202, 415, 422), r.text
    client = redis.Redis.from_url(redis_url)
    keys = wire.Keys(prefix)
    good = [enqueue(client, keys, c) for c in clips[1:]]
    worker = Worker(worker_settings(), client)
    worker.start()
    while worker.iterate() is not None:
        pass
    assert worker.settle()  # acked once a checkpoint holds them
    if r.status_code == 202:
        state = client.hget(keys.clip(r.json()["clip_id"]), "state")
        assert state in (b"learned", b"dead")
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in good)
    client.close()


def test_chunked_body_over_limit_is_413(api, good):
    def chunks():
        for _ in range(40):
            yield b"\x00" * 10_000

    r = api.post("/ingest", content=chunks(), headers=MP4)
    assert r.status_code == 413
