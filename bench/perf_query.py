"""Query embeddings: single-clip POST /embed latency and what dynamic batching buys.

1. Latency: a private redis-server, ``flava serve`` and one ``flava embedder`` as real
   processes, a `tiny` model published; one client POSTs a real 2 s MP4 clip ``--requests``
   times in a row (each answered 200); p50 / p99 of the client-observed time. The learner is
   not running: this is the query path alone (decode + model + two Redis hops + HTTP). Then
   the same while a learner (``flava worker``) trains on a stream ``flava push`` sends: the
   embedder and the learner share the 2 cores.
2. Batching, on pre-decoded inputs, one process, one torch thread on both sides: 16 waiting
   single-clip requests (concurrency 16) embedded as one model call of 16 (what the
   embedder's batching does when 16 requests wait) vs 16 calls of 1 (``max_batch=1``);
   clips per second over ``--rounds`` rounds, median.

    python -m bench.perf_query [--requests 200] [--rounds 20]   # writes bench/results/query.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULT = Path("bench/results/query.json")
CONCURRENCY = 16


def _publish(models_dir: str, url: str, prefix: str) -> None:
    import redis

    from contract import wire
    from worker.core.learner import LearnerConfig, build_learner
    from worker.core.model import preset
    from worker.models import ModelPublisher, PublishConfig

    learner = build_learner("flava", preset("tiny"), LearnerConfig(seed=0))
    client = redis.Redis.from_url(url)
    pub = ModelPublisher(
        PublishConfig(models_dir, 1, 1), client, wire.Keys(prefix), "flava", "tiny"
    )
    pub.maybe_publish(learner, "1.1", 1)
    pub.flush()
    client.close()


def _clip() -> bytes:
    from worker.core.synthetic import StreamConfig, make_clip, segment_specs

    cfg = StreamConfig(num_segments=1)
    return make_clip(segment_specs(cfg, 0, 1, seed=0)[0], cfg)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(requests: int, training: bool = False) -> dict:
    """Client-observed POST /embed time, real processes, one request at a time; with
    ``training``, while a learner (``flava worker``) trains on a stream ``flava push`` sends."""
    import httpx

    from flava.procs import RedisProcess, free_port, spawn, terminate, wait_until_ready

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(Path(tmp) / "redis", appendfsync="everysec")
        server.start()
        models = str(Path(tmp) / "models")
        _publish(models, server.url, "bench")
        port = free_port()
        env = {
            **os.environ,
            "FLAVA_REDIS_URL": server.url,
            "FLAVA_KEY_PREFIX": "bench",
            "FLAVA_MODELS_DIR": models,
            "FLAVA_CHECKPOINT_DIR": str(Path(tmp) / "checkpoints"),
            "FLAVA_INPUTS_DIR": str(Path(tmp) / "inputs"),
            "FLAVA_PUBLISH_EVERY": "0",  # the query side keeps the one model published above
        }
        log = Path(tmp) / "procs.log"
        procs = [
            spawn(["--log-level", "warning", "serve", "--port", str(port)], env, log),
            spawn(["--log-level", "warning", "embedder"], env, log),
        ]
        url = f"http://127.0.0.1:{port}"
        try:
            if training:
                wait_until_ready(f"{url}/healthz", 120, procs, log)  # before push sends
                procs.append(spawn(["--log-level", "warning", "worker"], env, log))
                # a stream long enough to outlast the measurement: 3 segments x 400 clips
                push = ["--log-level", "warning", "push", "--url", url, "--synthetic", "400"]
                procs.append(spawn(push, env, log))
                _wait_learning(server.url, timeout=300, log=log)
            before = _updates(server.url)
            result = _timed_posts(httpx, url, _clip(), requests)
            if training:  # the learner really trained while the queries were answered
                result["learner_updates_during"] = _updates(server.url) - before
            return result
        finally:
            for p in reversed(procs):
                terminate(p)
            server.stop()


def _updates(url: str) -> int:
    import redis

    from contract import wire

    client = redis.Redis.from_url(url)
    try:
        version = client.hget(wire.Keys("bench").model, "version")
        return wire.ModelVersion.parse(version.decode()).updates if version else 0
    finally:
        client.close()


def _wait_learning(url: str, timeout: float, log: Path) -> None:
    """Until the learner has taken its first updates (it is training when we measure)."""
    deadline = time.monotonic() + timeout
    while _updates(url) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the learner did not start training:\n{log.read_text()[-3000:]}")
        time.sleep(1.0)


def _timed_posts(httpx, url: str, clip: bytes, requests: int) -> dict:
    headers = {"Content-Type": "video/mp4"}
    with httpx.Client(base_url=url, timeout=60) as http:
        deadline = time.monotonic() + 180
        while True:  # until the API and the embedder are up
            try:
                if http.post("/embed", content=clip, headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API or the embedder did not start"
            time.sleep(0.5)
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            r = http.post("/embed", content=clip, headers=headers)
            times.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
    return {
        "requests": requests,
        "p50_ms": round(1000 * statistics.median(times), 1),
        "p99_ms": round(1000 * _percentile(times, 0.99), 1),
        "max_ms": round(1000 * max(times), 1),
    }


def batching(rounds: int) -> dict:
    """clips/s: one call of 16 vs 16 calls of 1, pre-decoded, one torch thread."""
    import torch

    from worker.core.media import decode_clip
    from worker.embedder import embed_clips
    from worker.models import load_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        from flava.procs import RedisProcess

        server = RedisProcess(Path(tmp) / "redis", appendfsync="everysec")
        server.start()
        try:
            _publish(tmp, server.url, "bench")
        finally:
            server.stop()
        loaded = load_model(tmp, "1.1")
    clips = [decode_clip(_clip(), loaded.media)] * CONCURRENCY
    embed_clips(loaded, clips)  # warm up
    batched, single = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        embed_clips(loaded, clips)
        batched.append(CONCURRENCY / (time.perf_counter() - started))
        started = time.perf_counter()
        for clip in clips:
            embed_clips(loaded, [clip])
        single.append(CONCURRENCY / (time.perf_counter() - started))
    b, s = statistics.median(batched), statistics.median(single)
    return {
        "concurrency": CONCURRENCY,
        "rounds": rounds,
        "batched_clips_per_s": round(b, 1),
        "unbatched_clips_per_s": round(s, 1),
        "speedup": round(b / s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args(argv)
    result = {
        "preset": "tiny",
        "machine": f"{os.cpu_count()} cores",
        "latency": latency(args.requests),
        "latency_while_training": latency(args.requests, training=True),
        "batching": batching(args.rounds),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))  # noqa: T201 - a benchmark's report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
