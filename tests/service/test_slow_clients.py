"""What an upload costs the API: slow clients (in their headers or their body) are cut off
while others ingest; a multipart body is parsed as it streams, not joined in memory."""

from __future__ import annotations

import asyncio
import resource
import selectors
import socket
import threading
import time
import tracemalloc

import httpx
import pytest
import uvicorn
from starlette.requests import Request

from service.app import _read_upload, create_app
from service.http_protocol import server_options
from service.settings import ApiSettings
from tests.worker.core.media_fixtures import ClipSpec, encode_clip

# The 1,000 sockets trickling one byte every 10 s (deadlines 10 s), time scaled to
# fit a test: one byte every TRICKLE_S. HEADS send their headers that slowly (one more sends
# nothing), BODIES their body to /ingest, QUERIES theirs to POST /embed; deadlines
# HEADER_TIMEOUT_S for a head and ~1 s for a body. Each is cut off with 408; meanwhile
# another client's POST /ingest answers 202 at once (11-13 ms measured, 5-51 ms alone).
HEADS, BODIES, QUERIES = 600, 300, 99
TRICKLE_S = 0.5
HEADER_TIMEOUT_S = 2.0
SOCKETS = HEADS + BODIES + QUERIES + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(redis_url, prefix, tmp_path):
    """The API under uvicorn on loopback with `flava serve`'s options (server_options)."""
    settings = ApiSettings(
        redis_url=redis_url,
        key_prefix=prefix,
        blob_dir=str(tmp_path / "blobs"),
        body_idle_s=1.0,
        body_grace_s=1.0,
        body_min_rate=1024,
        header_timeout_s=HEADER_TIMEOUT_S,
        limit_concurrency=SOCKETS + 32,
    )
    port = _free_port()
    options = server_options(settings)
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", **options
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


HEAD = (
    "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\nContent-Length: 100000\r\n\r\n"
)


class Tricklers:
    """Sockets that each send one byte every TRICKLE_S (the first ``heads`` the bytes of
    their headers, the others a body after whole headers), from one thread; each keeps
    what the server answered before it closed the connection."""

    def __init__(self, url: str, heads: int, bodies: dict[str, int], silent: int = 1):
        host, port = url.removeprefix("http://").split(":")
        self.selector = selectors.DefaultSelector()
        self.pending: dict[socket.socket, bytes] = {}  # socket -> bytes still to send
        self.answers: dict[socket.socket, bytes] = {}
        self.kinds: dict[socket.socket, str] = {}
        plans = [("head", HEAD.format(path="/ingest").encode(), b"")] * heads
        for path, count in bodies.items():
            plans += [(path, b"\x00" * 100_000, HEAD.format(path=path).encode())] * count
        plans += [("silent", b"", b"")] * silent
        for kind, trickled, sent_whole in plans:
            sock = socket.create_connection((host, int(port)))
            sock.sendall(sent_whole)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.pending[sock], self.answers[sock], self.kinds[sock] = trickled, b"", kind
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.opened_at = time.monotonic()
        self.closed_at: dict[socket.socket, float] = {}

    def _run(self) -> None:
        next_send = time.monotonic()
        while not self.stop.is_set() and len(self.closed_at) < len(self.kinds):
            if time.monotonic() >= next_send:
                for sock, rest in self.pending.items():
                    if rest and sock not in self.closed_at:
                        self._send_one(sock, rest)
                next_send += TRICKLE_S
            for key, _ in self.selector.select(timeout=0.05):
                self._read(key.fileobj)

    def _send_one(self, sock: socket.socket, rest: bytes) -> None:
        try:
            sock.send(rest[:1])
            self.pending[sock] = rest[1:]
        except OSError:
            pass  # closed by the server: the read sees it

    def _read(self, sock) -> None:
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        self.answers[sock] += data
        if not data:
            self.closed_at[sock] = time.monotonic()
            self.selector.unregister(sock)
            sock.close()

    def __enter__(self) -> Tricklers:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        for sock in self.kinds:
            if sock not in self.closed_at:
                sock.close()

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.closed_at) < len(self.kinds) and time.monotonic() < deadline:
            time.sleep(0.1)

    def by_kind(self, kind: str) -> list[tuple[bytes, float]]:
        """(answer, seconds open) of each socket of one kind."""
        return [
            (self.answers[s], self.closed_at.get(s, float("inf")) - self.opened_at)
            for s, k in self.kinds.items()
            if k == kind
        ]


def _ingest_while(url: str, clip: bytes, tricklers: Tricklers, count: int) -> list[float]:
    """POST the clip ``count`` times in a row while the tricklers hold their sockets: the
    seconds each took (each must be a 202)."""
    took = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(count):
            started = time.monotonic()
            r = http.post("/ingest", content=clip, headers={"Content-Type": "video/mp4"})
            assert r.status_code in (200, 202), r.text
            took.append(time.monotonic() - started)
    assert len(tricklers.closed_at) < len(tricklers.kinds)  # they were still trickling
    return took


@pytest.fixture
def descriptors():
    """Both ends of every socket are in this process: two descriptors each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * SOCKETS + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_trickling_sockets_are_cut_off_while_others_ingest(descriptors, server):
    clips = [encode_clip(ClipSpec(seconds=1.0, tone_hz=500.0 + 100 * i)) for i in range(3)]
    bodies = {"/ingest": BODIES, "/embed": QUERIES}
    with Tricklers(server, HEADS, bodies) as tricklers:
        time.sleep(TRICKLE_S)  # every socket is open and has sent a byte
        took = [t for clip in clips for t in _ingest_while(server, clip, tricklers, 1)]
        tricklers.wait_closed(timeout=30)
    assert len(tricklers.closed_at) == SOCKETS, f"{SOCKETS - len(tricklers.closed_at)} still open"
    assert max(took) < 5.0, took
    for kind in ("head", "silent"):
        for answer, held in tricklers.by_kind(kind):
            assert answer.startswith(b"HTTP/1.1 408") and b"header_timeout" in answer, answer
            assert held < HEADER_TIMEOUT_S + 10, held  # not for ever
    for kind in bodies:
        for answer, _ in tricklers.by_kind(kind):
            assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer


def test_the_header_deadline_spares_a_slow_body_and_restarts_per_request(server):
    """A body that takes longer than the header deadline at a fair rate is accepted; the
    next request on that kept-alive connection gets a deadline of its own."""
    clip = encode_clip(ClipSpec(seconds=1.0, tone_hz=1700.0))
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = HEAD.replace("100000", str(len(clip))).format(path="/ingest")
        sock.sendall(head.encode())
        step = max(1, len(clip) // 30)
        for i in range(0, len(clip), step):  # ~30 pieces over ~3 s: past the head's deadline
            sock.sendall(clip[i : i + step])
            time.sleep(0.1)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # the next request stalls in its head
        sock.settimeout(HEADER_TIMEOUT_S + 10)
        started = time.monotonic()
        cut = sock.recv(65536)
        assert cut.startswith(b"HTTP/1.1 408") and b"header_timeout" in cut, cut
        assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - started < HEADER_TIMEOUT_S + 5


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
