"""The service benchmarks of ``bench.perf``: real API, worker and redis-server processes.

Order in one run: start a private redis-server (append-only, fsync every second) and the API
(``flava serve``); 4. ingest rounds with no worker, then FLUSHDB; start the worker (``flava
worker``); 3. service throughput; 5. embed reads on the clips the worker embedded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
import redis.asyncio as aioredis

from bench.perfkit import Comparison, Stats, in_fresh_process
from contract import wire
from flava.procs import RedisProcess, free_port, spawn, terminate, wait_until_ready

log = logging.getLogger(__name__)
PREFIX = "perf"
RAW_PREFIX = "perf-raw"
BLOB_TTL_S = 3600
MAX_BACKLOG = 1_000_000
MAX_BACKLOG_BYTES = 1 << 40  # the rounds measure ingest, never backpressure
LIMITS = wire.IngestLimits(BLOB_TTL_S, MAX_BACKLOG, MAX_BACKLOG_BYTES)


@dataclass
class ServiceConfig:
    clips: int = 160  # clips measured through the service (after the warm-up clips)
    warmup_clips: int = 8  # learned before the measurement starts (first-step costs)
    batch_size: int = 8
    method: str = "flava"
    preset: str = "tiny"
    post_concurrency: int = 4  # senders while measuring service throughput
    concurrency: int = 8  # ingest and embed clients
    ingest_requests: int = 64  # per round and side
    ingest_rounds: int = 7  # alternating API / raw Redis rounds per side
    payload_bytes: int = 1 << 20
    real_payload: bool = True  # a real ~1 MB clip, else the small decode clip padded to size
    embed_requests: int = 400  # per round and side
    embed_rounds: int = 5
    api_workers: int = 1  # flava serve --workers
    profile: bool = False  # py-spy record the worker (service) and the API (ingest)
    timeout_s: float = 900.0


# ---------------------------------------------------------------------------------------
# the running stack


class Stack:
    """redis-server + API (+ worker, started later) as real processes under ``workdir``."""

    def __init__(self, cfg: ServiceConfig, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.redis = RedisProcess(workdir / "redis", appendfsync="everysec")
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.port = free_port()
        self.worker_metrics_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        c = self.cfg
        return {
            **os.environ,
            "FLAVA_REDIS_URL": self.redis.url,
            "FLAVA_KEY_PREFIX": PREFIX,
            "FLAVA_MAX_BACKLOG": str(MAX_BACKLOG),
            "FLAVA_MAX_BACKLOG_BYTES": str(MAX_BACKLOG_BYTES),
            "FLAVA_BLOB_TTL_S": str(BLOB_TTL_S),
            "FLAVA_METHOD": c.method,
            "FLAVA_PRESET": c.preset,
            "FLAVA_DEVICE": "cpu",
            "FLAVA_BATCH_SIZE": str(c.batch_size),
            "FLAVA_BLOCK_MS": "20",
            "FLAVA_HEARTBEAT_S": "1",
            "FLAVA_CONSUMER": "perf-worker",
            "FLAVA_CHECKPOINT_DIR": str(self.workdir / "checkpoints"),
            "FLAVA_BLOB_DIR": str(self.workdir / "blobs"),
            "FLAVA_INPUTS_DIR": str(self.workdir / "inputs"),
            "FLAVA_MODELS_DIR": str(self.workdir / "models"),
            "FLAVA_METRICS_PORT": str(self.worker_metrics_port),
        }

    def __enter__(self) -> Stack:
        self.redis.start()
        self.api = spawn(
            ["--log-level", "warning", "serve", "--port", str(self.port)]
            + (["--workers", str(self.cfg.api_workers)] if self.cfg.api_workers > 1 else []),
            self.env(),
            self.workdir / "api.log",
        )
        wait_until_ready(f"{self.url}/healthz", 60, [self.api], self.workdir / "api.log")
        return self

    def start_worker(self) -> None:
        self.worker = spawn(["worker"], self.env(), self.workdir / "worker.log")
        wait_until_ready(f"{self.url}/readyz", 180, [self.worker], self.workdir / "worker.log")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def __exit__(self, *exc) -> None:
        for proc in (self.worker, self.api):
            if proc is not None:
                terminate(proc, timeout=30)
        self.redis.stop()


@contextlib.contextmanager
def py_spy(pid: int | None, out: Path, enabled: bool) -> Iterator[Path | None]:
    """``py-spy record`` (collapsed stacks, idle included) on ``pid`` while the block runs."""
    binary = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not enabled or pid is None or binary is None:
        if enabled and binary is None:
            log.warning("py-spy is not installed (pip install py-spy): no profile")
        yield None
        return
    args = [binary, "record", "--pid", str(pid), "--idle", "--rate", "50", "--format", "raw"]
    args.append("--nonblocking")  # never pause the process being measured
    proc = subprocess.Popen(
        [*args, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(1.0)  # attach before the measured work starts
    try:
        yield out
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def summarize_profile(path: Path | None, focus: str, depth: int = 4, floor: float = 0.02) -> str:
    """Where the time under ``focus`` goes, as a call tree ``depth`` levels deep (inclusive
    shares of its samples, branches under ``floor`` left out), from py-spy's raw output."""
    if path is None or not path.exists():
        return ""
    paths: Counter[tuple[str, ...]] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if not count.isdigit() or focus not in frames:
            continue
        total += int(count)
        below = frames[frames.index(focus) + 1 :]
        for d in range(1, min(depth, len(below)) + 1):
            paths[tuple(below[:d])] += int(count)
    if not total:
        return f"no samples under {focus}"
    lines = [f"{total} samples under {focus} at 50 Hz, waiting included (inclusive share):"]
    lines += _tree(paths, (), total, floor)
    return "\n".join(lines)


def _tree(paths: Counter, prefix: tuple[str, ...], total: int, floor: float) -> list[str]:
    children = [(p, n) for p, n in paths.items() if len(p) == len(prefix) + 1 and p[:-1] == prefix]
    lines = []
    for p, n in sorted(children, key=lambda item: -item[1]):
        if n / total >= floor:
            lines.append(f"{100 * n / total:5.1f}%  {'  ' * len(prefix)}{p[-1]}")
            lines += _tree(paths, p, total, floor)
    return lines


# ---------------------------------------------------------------------------------------
# concurrency driver


async def drive(
    send: Callable[[bytes | str], Awaitable[None]], items: Sequence, concurrency: int
) -> tuple[float, list[float]]:
    """Send every item with ``concurrency`` senders: (wall seconds, per-item latencies)."""
    queue: deque = deque(items)
    latencies: list[float] = []

    async def sender() -> None:
        while queue:
            item = queue.popleft()
            started = time.perf_counter()
            await send(item)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def round_stats(rounds: list[tuple[float, list[float]]], requests: int) -> tuple[Stats, Stats]:
    """(requests/s per round, latency ms over all requests)."""
    throughput = Stats.of([requests / wall for wall, _ in rounds], "req/s")
    latency = Stats.of([1000 * s for _, lat in rounds for s in lat], "ms")
    return throughput, latency


# ---------------------------------------------------------------------------------------
# 4. ingest


def padded(base: bytes, size: int, tag: int) -> bytes:
    """``base`` + an MP4 'free' box holding ``tag``: ``size`` bytes, unique per tag."""
    pad = size - len(base)
    if pad < 16:
        raise ValueError(f"base clip of {len(base)} bytes leaves no room in {size}")
    return base + pad.to_bytes(4, "big") + b"free" + tag.to_bytes(8, "big") + bytes(pad - 16)


def ingest_base_clip(cfg: ServiceConfig, workdir: Path) -> bytes:
    """A real 10 s 224x224 25 fps clip just under ``payload_bytes`` (or a small one, quick)."""
    from bench.perf import make_decode_clip
    from worker.core.synthetic import ClipSpec, StreamConfig, encode_mp4, render_clip

    if not cfg.real_payload:
        return make_decode_clip(workdir / "ingest-small.mp4", 2.0).read_bytes()
    stream = StreamConfig(seconds=10.0, fps=25, size=224, num_segments=1, video_noise=(5.0,))
    frames, audio = render_clip(ClipSpec(0, 1, 777), stream)
    for crf in range(24, 40, 2):
        data = encode_mp4(frames, audio, stream.fps, stream.sample_rate, stream.codec, crf)
        if len(data) <= cfg.payload_bytes - 64:
            return data
    raise RuntimeError("could not encode a clip under the payload size")


async def _api_round(url: str, payloads: list[bytes], concurrency: int):
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

        async def send(data) -> None:
            r = await http.post("/ingest", content=data, headers={"Content-Type": "video/mp4"})
            if r.status_code != 202:
                raise RuntimeError(f"/ingest answered {r.status_code}: {r.text[:200]}")

        return await drive(send, payloads, concurrency)


async def _raw_round(redis_url: str, payloads: list[bytes], concurrency: int):
    client = aioredis.Redis.from_url(redis_url, max_connections=concurrency)
    script, keys = client.register_script(wire.INGEST_SCRIPT), wire.Keys(RAW_PREFIX)

    async def send(data) -> None:
        clip_id = hashlib.sha256(data).hexdigest()
        entry = wire.ClipEntry(clip_id, len(data), "video/mp4")
        script_keys, args = wire.ingest_call(keys, entry, data, LIMITS)
        outcome, *_ = await script(keys=script_keys, args=args)
        if outcome != b"queued":
            raise RuntimeError(f"raw ingest: {outcome!r}")

    try:
        return await drive(send, payloads, concurrency)
    finally:
        await client.aclose()


def bench_ingest(stack: Stack, cfg: ServiceConfig) -> Comparison:
    base, n = ingest_base_clip(cfg, stack.workdir), cfg.ingest_requests
    api_rounds, raw_rounds, tag = [], [], 0
    with py_spy(
        stack.api.pid if stack.api else None, stack.workdir / "api.spy", cfg.profile
    ) as spy:
        for _ in range(cfg.ingest_rounds):
            payloads = [padded(base, cfg.payload_bytes, tag + i) for i in range(n)]
            tag += n
            api_rounds.append(asyncio.run(_api_round(stack.url, payloads, cfg.concurrency)))
            raw_rounds.append(asyncio.run(_raw_round(stack.redis.url, payloads, cfg.concurrency)))
            stack.client().flushdb()
    (api_tp, api_lat), (raw_tp, raw_lat) = round_stats(api_rounds, n), round_stats(raw_rounds, n)
    c = Comparison(
        "ingest",
        f"POST /ingest of {cfg.payload_bytes // 1024} KiB clips at concurrency {cfg.concurrency}",
        "API (probe + sha256 + ingest script)",
        api_tp,
        "redis-py, same ingest script and payloads",
        raw_tp,
        target=">= 0.5",
    )
    c.extra.update({"API latency": api_lat, "redis-py latency": raw_lat})
    c.extra["latency p50 / p99 (API)"] = f"{api_lat.median:.1f} / {api_lat.p99:.1f} ms"
    c.notes.append(
        f"{cfg.ingest_rounds} rounds of {n} requests per side, API and redis-py rounds "
        "alternating; clients are asyncio (httpx / redis.asyncio) in the benchmark process; "
        f"payload: {'a real' if cfg.real_payload else 'a small'} H.264+AAC clip ({len(base)} "
        "bytes) padded with a unique MP4 'free' box."
    )
    if spy is not None:
        c.extra["py-spy profile of the API's event loop"] = summarize_profile(spy, "Runner.run")
        c.extra["py-spy profile of the API's worker threads"] = summarize_profile(
            spy, "WorkerThread.run"
        )
    return c


# ---------------------------------------------------------------------------------------
# 3. service throughput


def stream_clips(n: int, workdir: Path) -> list[Path]:
    """``n`` synthetic stream clips (the tiny preset's 3 s 128x128 scenes) as files."""
    from worker.core.synthetic import StreamConfig, drifting_stream

    paths = []
    for i, (_, data) in enumerate(drifting_stream(StreamConfig(num_segments=1), n, seed=7)):
        path = workdir / f"stream-{i:04d}.mp4"
        path.write_bytes(data)
        paths.append(path)
    return paths


def learner_child(paths: list[str], cfg: ServiceConfig) -> dict[str, list[float]]:
    """In a fresh process: decode ``paths``, then time the learner's steps on them.

    The first batch (warm-up clips) is stepped untimed. Returns seconds per later step
    ("step") and per decoded clip ("decode", one thread, in this process)."""
    from worker.core.learner import LearnerConfig, build_learner
    from worker.core.media import decode_clip
    from worker.core.model import preset
    from worker.runner import _batch

    model_cfg = preset(cfg.preset)
    clips, decode = [], []
    for path in paths:
        data, started = Path(path).read_bytes(), time.perf_counter()
        clips.append(decode_clip(data, model_cfg.media()))
        decode.append(time.perf_counter() - started)
    learner = build_learner(cfg.method, model_cfg, LearnerConfig(seed=0), device="cpu")
    batches = [clips[: cfg.warmup_clips]]
    rest = clips[cfg.warmup_clips :]
    batches += [rest[i : i + cfg.batch_size] for i in range(0, len(rest), cfg.batch_size)]
    seconds = []
    for i, group in enumerate(batches):
        started = time.perf_counter()
        learner.step(_batch(group))
        if i:
            seconds.append(time.perf_counter() - started)
    return {"step": seconds, "decode": decode}


def _post_all(url: str, paths: list[Path], concurrency: int) -> list[str]:
    async def run() -> list[str]:
        ids: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:

            async def send(path) -> None:
                r = await http.post(
                    "/ingest", content=path.read_bytes(), headers={"Content-Type": "video/mp4"}
                )
                r.raise_for_status()
                ids.append(r.json()["clip_id"])

            await drive(send, paths, concurrency)
        return ids

    return asyncio.run(run())


def _written_at(client: redis.Redis, ids: list[str], timeout: float) -> dict[str, float]:
    """Poll until every clip's embedding exists: clip id -> written_at (unix seconds)."""
    keys, deadline, done = wire.Keys(PREFIX), time.monotonic() + timeout, {}
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(done)}/{len(ids)} clips embedded in {timeout} s")
        pipe = client.pipeline(transaction=False)
        waiting = [cid for cid in ids if cid not in done]
        for cid in waiting:
            pipe.hget(keys.embedding(cid), "written_at")
        for cid, value in zip(waiting, pipe.execute(), strict=True):
            if value is not None:
                done[cid] = float(value)
        time.sleep(0.25)  # the times come from written_at: polling less steals less CPU
    return done


def batch_throughputs(written: dict[str, float]) -> list[float]:
    """Clips/s of each batch after the first: clips written together / time since the last."""
    counts = Counter(written.values())  # a batch's clips share their written_at
    times = sorted(counts)
    return [counts[t] / (t - prev) for prev, t in zip(times, times[1:], strict=False)]


def worker_histograms(port: int) -> dict[str, tuple[float, float]]:
    """{histogram name: (sum, count)} from the worker's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        values = {s.name: s.value for s in family.samples}
        if f"{family.name}_count" in values:
            out[family.name] = (values[f"{family.name}_sum"], values[f"{family.name}_count"])
    return out


def _window_means(before: dict, after: dict) -> dict[str, str]:
    """Mean of each worker histogram over the measured window, in ms."""
    out = {}
    for name in ("flava_train_step_seconds", "flava_batch_seconds", "flava_decode_seconds"):
        total = after[name][0] - before[name][0]
        count = after[name][1] - before[name][1]
        if count:
            out[name] = f"{1000 * total / count:.1f} ms (n={count:.0f})"
    return out


def bench_service(stack: Stack, cfg: ServiceConfig) -> tuple[Comparison, list[str]]:
    paths = stream_clips(cfg.warmup_clips + cfg.clips, stack.workdir)
    str_paths = [str(p) for p in paths]
    baseline = in_fresh_process(learner_child, str_paths, cfg)
    stack.start_worker()
    client = stack.client()
    warm = _post_all(stack.url, paths[: cfg.warmup_clips], 1)
    _written_at(client, warm, cfg.timeout_s)
    worker_pid = stack.worker.pid if stack.worker else None
    before = worker_histograms(stack.worker_metrics_port)
    with py_spy(worker_pid, stack.workdir / "worker.spy", cfg.profile) as spy:
        posted = time.time()
        ids = _post_all(stack.url, paths[cfg.warmup_clips :], cfg.post_concurrency)
        written = _written_at(client, ids, cfg.timeout_s)
    inside = _window_means(before, worker_histograms(stack.worker_metrics_port))
    again = in_fresh_process(learner_child, str_paths, cfg)
    client.close()
    steps, decode = baseline["step"] + again["step"], baseline["decode"] + again["decode"]
    per_batch = batch_throughputs(written)
    c = Comparison(
        "service",
        f"clips/s POST /ingest -> embedding written ({cfg.method}, {cfg.preset}, "
        f"batch {cfg.batch_size}, {cfg.clips} clips)",
        "service (API + worker + Redis), per batch",
        Stats.of(per_batch, "clips/s"),
        "learner.step on the same clips, pre-decoded",
        Stats.of([cfg.batch_size / s for s in steps], "clips/s"),
        target=">= 0.8",
    )
    overall = len(ids) / (max(written.values()) - posted)
    c.extra["service overall (all clips / first POST to last embedding)"] = f"{overall:.2f} clips/s"
    c.extra["learner step time, alone"] = Stats.of([1000 * s for s in steps], "ms")
    c.extra["decode per clip, one thread (the learner's process)"] = Stats.of(
        [1000 * s for s in decode], "ms"
    )
    c.extra["inside the worker, means over the measured window"] = inside
    c.notes.append(
        "the worker's per-batch throughput is (clips written together) / (time since the "
        "previous batch was written), for every batch after the first measured one; the "
        "learner runs in its own process before and after the service run (pooled)."
    )
    if spy is not None:
        c.extra["py-spy profile of the worker's loop"] = summarize_profile(spy, "Worker.iterate")
    return c, warm + ids


# ---------------------------------------------------------------------------------------
# 5. embed reads


async def _api_reads(url: str, ids: list[str], concurrency: int):
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:

        async def send(cid) -> None:
            r = await http.get("/embed", params={"clip_id": cid})
            if r.status_code != 200:
                raise RuntimeError(f"/embed answered {r.status_code}")

        return await drive(send, ids, concurrency)


async def _raw_reads(redis_url: str, ids: list[str], concurrency: int):
    client, keys = (
        aioredis.Redis.from_url(redis_url, max_connections=concurrency),
        wire.Keys(PREFIX),
    )

    async def send(cid) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(keys.clip(cid))
        pipe.hgetall(keys.embedding(cid))
        _, emb = await pipe.execute()
        wire.Embedding.from_fields(emb)

    try:
        return await drive(send, ids, concurrency)
    finally:
        await client.aclose()


def bench_embed(stack: Stack, cfg: ServiceConfig, ids: list[str]) -> Comparison:
    n = cfg.embed_requests
    requests = [ids[i % len(ids)] for i in range(n)]
    api_rounds, raw_rounds = [], []
    for _ in range(cfg.embed_rounds):
        api_rounds.append(asyncio.run(_api_reads(stack.url, requests, cfg.concurrency)))
        raw_rounds.append(asyncio.run(_raw_reads(stack.redis.url, requests, cfg.concurrency)))
    (api_tp, api_lat), (raw_tp, raw_lat) = round_stats(api_rounds, n), round_stats(raw_rounds, n)
    c = Comparison(
        "embed",
        f"GET /embed at concurrency {cfg.concurrency} ({len(ids)} embedded clips)",
        "API",
        api_tp,
        "redis-py reading the same two hashes + decoding the vectors",
        raw_tp,
    )
    c.extra.update({"API latency": api_lat, "redis-py latency": raw_lat})
    c.extra["latency p50 / p99 (API)"] = f"{api_lat.median:.2f} / {api_lat.p99:.2f} ms"
    c.notes.append(f"{cfg.embed_rounds} rounds of {n} reads per side, alternating.")
    return c


def run_service_benches(cfg: ServiceConfig, workdir: Path, only: set[str]) -> list[Comparison]:
    """4. ingest, 3. service, 5. embed (in that order) on one stack; those named in ``only``."""
    wanted = only & {"ingest", "service", "embed"}
    if not wanted:
        return []
    out: list[Comparison] = []
    with Stack(cfg, workdir) as stack:
        if "ingest" in wanted:
            out.append(bench_ingest(stack, cfg))
        if wanted & {"service", "embed"}:
            service, ids = bench_service(stack, cfg)
            out += [service] if "service" in wanted else []
            out += [bench_embed(stack, cfg, ids)] if "embed" in wanted else []
    order = {"service": 0, "ingest": 1, "embed": 2}
    return sorted(out, key=lambda c: order[c.bench])
