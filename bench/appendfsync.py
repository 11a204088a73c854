"""What `appendfsync always` costs at ingest, against `everysec` (docs/durability.md).

For each setting: a private redis-server with that setting and the API (`flava serve`) as real
processes; rounds of real POST /ingest of distinct clips, one sender (latency) and
``concurrency`` senders (throughput), the settings' rounds alternating so that drift on a
shared machine falls on both. Then Redis is SIGKILLed and restarted from its append-only
file, and the accepted clips it still holds are counted.

    python -m bench.appendfsync [--requests 200] [--rounds 5] -> bench/results/appendfsync.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from bench.perf import make_decode_clip
from bench.perf_service import _api_round, padded
from bench.perfkit import Stats
from flava.procs import RedisProcess, free_port, spawn, terminate, wait_until_ready

log = logging.getLogger(__name__)
SETTINGS = ("everysec", "always")
PREFIX = "fsync"
OUT = Path(__file__).parent / "results" / "appendfsync.json"


@dataclass
class BenchConfig:
    requests: int = 200  # POSTs per round and sender count
    rounds: int = 5  # per setting, alternating
    concurrency: int = 8  # senders in the throughput rounds
    payload_bytes: int = 256 * 1024  # each clip: a real 2 s MP4 padded to this size


class Stack:
    """redis-server with one appendfsync setting + the API, as real processes."""

    def __init__(self, setting: str, workdir: Path):
        self.redis = RedisProcess(workdir / "redis", appendfsync=setting)
        self.port, self.workdir = free_port(), workdir
        self.api = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Stack:
        self.redis.start()
        env = {
            **os.environ,
            "FLAVA_REDIS_URL": self.redis.url,
            "FLAVA_KEY_PREFIX": PREFIX,
            "FLAVA_MAX_BACKLOG": "1000000",
            "FLAVA_MAX_BACKLOG_BYTES": str(1 << 40),
        }
        args = ["--log-level", "warning", "serve", "--port", str(self.port)]
        self.api = spawn(args, env, self.workdir / "api.log")
        wait_until_ready(f"{self.url}/healthz", 60, [self.api], self.workdir / "api.log")
        return self

    def __exit__(self, *exc) -> None:
        terminate(self.api, timeout=30)
        self.redis.stop()


def survivors_of_a_sigkill(server: RedisProcess, accepted: int) -> dict:
    """SIGKILL redis-server (no shutdown, no final fsync), restart it from its AOF, count."""
    server.proc.kill()
    server.proc.wait()
    server.start()
    client = redis.Redis.from_url(server.url)
    kept = sum(1 for _ in client.scan_iter(f"{PREFIX}:clip:*", count=1000))
    client.close()
    return {"accepted": accepted, "kept_after_sigkill": kept, "lost": accepted - kept}


def run(cfg: BenchConfig, workdir: Path) -> dict:
    base = make_decode_clip(workdir / "clip.mp4", 2.0).read_bytes()
    tags = iter(range(1 << 30))
    samples = {s: {"latency_ms": [], "throughput": []} for s in SETTINGS}
    stacks = {s: Stack(s, workdir / s).__enter__() for s in SETTINGS}
    try:
        for _ in range(cfg.rounds):
            for setting, stack in stacks.items():
                measure_round(stack, cfg, base, tags, samples[setting])
        return {s: summary(samples[s], stacks[s], cfg) for s in SETTINGS}
    finally:
        for stack in stacks.values():
            stack.__exit__()


def measure_round(stack: Stack, cfg: BenchConfig, base: bytes, tags, into: dict) -> None:
    """One latency round (one sender) and one throughput round (``concurrency`` senders)."""
    one = [padded(base, cfg.payload_bytes, next(tags)) for _ in range(cfg.requests)]
    _, latencies = asyncio.run(_api_round(stack.url, one, 1))
    into["latency_ms"] += [1000 * s for s in latencies]
    many = [padded(base, cfg.payload_bytes, next(tags)) for _ in range(cfg.requests)]
    wall, _ = asyncio.run(_api_round(stack.url, many, cfg.concurrency))
    into["throughput"].append(cfg.requests / wall)


def summary(samples: dict, stack: Stack, cfg: BenchConfig) -> dict:
    accepted = 2 * cfg.requests * cfg.rounds
    return {
        "ingest_latency_ms": asdict(Stats.of(samples["latency_ms"], "ms")),
        "ingest_throughput_per_s": asdict(Stats.of(samples["throughput"], "req/s")),
        "redis_sigkill": survivors_of_a_sigkill(stack.redis, accepted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(BenchConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    cfg = BenchConfig(**vars(parser.parse_args()))
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(cfg, Path(tmp))
    report = {
        "config": asdict(cfg),
        "redis": os.popen("redis-server --version").read().strip(),
        "elapsed_s": round(time.time() - started, 1),
        "results": results,
        "command": "python -m bench.appendfsync",
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", OUT)
    for setting, r in results.items():
        lat, tput = r["ingest_latency_ms"], r["ingest_throughput_per_s"]
        log.info(
            "%s: %.1f ms median, %.0f req/s, %s",
            setting,
            lat["median"],
            tput["median"],
            r["redis_sigkill"],
        )


if __name__ == "__main__":
    main()
