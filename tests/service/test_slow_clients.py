"""What an upload costs the API: slow clients are cut off while others ingest; a multipart
body is parsed as it streams, not joined in memory."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import tracemalloc

import httpx
import pytest
import uvicorn
from starlette.requests import Request

from service.app import _read_upload, create_app
from service.settings import ApiSettings
from tests.worker.core.media_fixtures import ClipSpec, encode_clip

TRICKLERS = 40  # sockets on loopback sending one body byte every 0.5 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(redis_url, prefix, tmp_path):
    """The API under uvicorn on loopback, stalled bodies cut after ~1 s."""
    settings = ApiSettings(
        redis_url=redis_url,
        key_prefix=prefix,
        blob_dir=str(tmp_path / "blobs"),
        body_idle_s=1.0,
        body_grace_s=1.0,
        body_min_rate=1024,
        limit_concurrency=TRICKLERS + 16,
    )
    port = _free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        limit_concurrency=settings.limit_concurrency,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def _trickle(url: str, stop: threading.Event, answers: list[bytes]) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            "POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
            "Content-Length: 100000\r\n\r\n"
        )
        sock.sendall(head.encode())
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                sock.sendall(b"\x00")
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            answers.append(answer)
            break


def test_trickling_clients_are_cut_off_and_others_ingest(server):
    stop = threading.Event()
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=_trickle, args=(server, stop, answers), daemon=True)
        for _ in range(TRICKLERS)
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all of them hold a connection and trickle
    clip = encode_clip(ClipSpec(seconds=1.0))
    started = time.monotonic()
    r = httpx.post(f"{server}/ingest", content=clip, headers={"Content-Type": "video/mp4"})
    assert r.status_code == 202, r.text
    assert time.monotonic() - started < 3.0
    deadline = time.monotonic() + 15
    while len(answers) < TRICKLERS and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(2)
    assert len(answers) == TRICKLERS
    assert all(a.startswith(b"HTTP/1.1 408") and b"body_timeout" in a for a in answers), answers[0]


def _request(body: bytes, content_type: str, chunk: int = 64 * 1024) -> Request:
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    sent = iter(range(len(chunks)))

    async def receive():
        i = next(sent, None)
        if i is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    headers = [(b"content-type", content_type.encode())]
    scope = {"type": "http", "method": "POST", "headers": headers, "path": "/ingest"}
    return Request(scope, receive)


def test_a_multipart_body_is_held_in_memory_once(tmp_path):
    size = 8 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n'
        f"Content-Type: video/mp4\r\n\r\n".encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = _request(body, f"multipart/form-data; boundary={boundary}")
    settings = ApiSettings(max_body_bytes=16 * 1024 * 1024, blob_dir=str(tmp_path))

    async def read() -> tuple:
        tracemalloc.start()
        try:
            answer = await _read_upload(request, settings)
            return answer, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    (received, content_type, _), peak = asyncio.run(read())
    assert received.data == payload and content_type == "video/mp4"
    del body  # the request's chunks are made as it is read; the body is the sender's
    assert peak < 1.5 * size, f"peak {peak / size:.2f}x the file"
