"""Chaos run: clips keep arriving while the worker is SIGKILLed and Redis restarts.

Real processes throughout: a private redis-server (append-only, fsync always), the API
(``flava serve``) and the worker (``flava worker``). A sender thread POSTs synthetic MP4s
(waiting out 429/503 as a client should); the main thread kills and restarts the worker
every few seconds and restarts Redis once. At the end every accepted clip must be learned
(embedding written) or dead-lettered with a reason: ``lost`` must be 0.

    python -m bench.chaos                 # the long run; writes bench/results/chaos.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis

from contract import wire
from flava.procs import RedisProcess, free_port, spawn, terminate
from flava.push import ApiClient

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"
PREFIX = "chaos"


@dataclass
class ChaosConfig:
    clips: int = 200  # training clips sent, over several drift segments
    bad_every: int = 25  # every n-th upload is corrupted mid-file (probe may pass it)
    kills: int = 5  # worker SIGKILLs while clips arrive
    kill_every_s: float = 8.0  # seconds between kills
    redis_restart_at_kill: int = 2  # restart Redis together with this kill (-1: never)
    batch_size: int = 8
    checkpoint_every: int = 5  # steps between checkpoints
    seed: int = 0
    settle_timeout_s: float = 300.0  # how long the final drain may take


@dataclass
class ChaosReport:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0  # 4xx from the API (corrupted uploads the probe caught)
    learned: int = 0
    dead_lettered: int = 0
    lost: int = 0  # accepted and neither learned nor dead-lettered: must be 0
    kills: int = 0
    redis_restarts: int = 0
    redeliveries: int = 0  # sum over finished clips of (deliveries - 1): upper bound on retraining
    clips_redelivered: int = 0
    versions_monotonic: bool = True
    final_version: int = 0
    recovery_s: list[float] = field(default_factory=list)  # worker restart -> first heartbeat
    dead_reasons: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


class Sender(threading.Thread):
    """POSTs the stream; records what the API accepted."""

    def __init__(self, url: str, token: str, cfg: ChaosConfig, report: ChaosReport):
        super().__init__(daemon=True)
        self.client = ApiClient(url, token, timeout=10.0)
        self.cfg, self.report = cfg, report
        self.accepted: list[str] = []

    def run(self) -> None:
        from worker.core.synthetic import StreamConfig, drifting_stream

        scfg = StreamConfig(num_segments=4)
        per_segment = -(-self.cfg.clips // scfg.num_segments)
        for i, (_, data) in enumerate(drifting_stream(scfg, per_segment, self.cfg.seed)):
            if i >= self.cfg.clips:
                break
            self._send(
                _corrupt(data, i) if self.cfg.bad_every and i % self.cfg.bad_every == 7 else data
            )

    def _send(self, data: bytes) -> None:
        self.report.sent += 1
        while True:
            try:
                answer = self.client.ingest(data, task="chaos", max_wait_s=120)
                self.accepted.append(answer["clip_id"])
                return
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code < 500:
                    self.report.rejected += 1
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)  # API or Redis restarting: retry, the clip is not accepted yet


def _corrupt(data: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    mid = len(data) // 2
    return data[:mid] + bytes(rng.randrange(256) for _ in range(1024)) + data[mid + 1024 :]


class VersionWatch(threading.Thread):
    """Polls the published model version; flags any step backwards."""

    def __init__(self, redis_url: str, report: ChaosReport):
        super().__init__(daemon=True)
        self.url, self.report, self.stop = redis_url, report, threading.Event()

    def run(self) -> None:
        client, last = redis.Redis.from_url(self.url, socket_timeout=2), 0
        while not self.stop.wait(0.2):
            try:
                value = int(client.hget(wire.Keys(PREFIX).model, "version") or 0)
            except redis.RedisError:
                continue
            if value < last:
                self.report.versions_monotonic = False
                log.error("model version went back from %d to %d", last, value)
            last = max(last, value)
        self.report.final_version = last


def run_chaos(cfg: ChaosConfig, workdir: Path) -> ChaosReport:
    report, started = ChaosReport(), time.monotonic()
    server = RedisProcess(workdir / "redis")
    server.start()
    env = _env(cfg, server.url, workdir)
    api = spawn(["serve", "--port", env["CHAOS_API_PORT"]], env, workdir / "api.log")
    worker = _start_worker(env, workdir, server.url, report)
    sender = Sender(
        f"http://127.0.0.1:{env['CHAOS_API_PORT']}", env["FLAVA_API_TOKEN"], cfg, report
    )
    watch = VersionWatch(server.url, report)
    sender.start()
    watch.start()
    try:
        worker = _kill_loop(cfg, env, workdir, server, worker, report)
        sender.join()
        _settle(server.url, sender.accepted, cfg.settle_timeout_s)
        _tally(server.url, sender.accepted, report)
    finally:
        watch.stop.set()
        watch.join()
        terminate(worker)
        terminate(api)
        server.stop()
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def _env(cfg: ChaosConfig, redis_url: str, workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_KEY_PREFIX": PREFIX,
        "FLAVA_API_TOKEN": "chaos-token",
        "FLAVA_CONSUMER": "chaos-worker",
        "FLAVA_BATCH_SIZE": str(cfg.batch_size),
        "FLAVA_CHECKPOINT_EVERY": str(cfg.checkpoint_every),
        "FLAVA_CHECKPOINT_DIR": str(workdir / "checkpoints"),
        "FLAVA_BLOCK_MS": "200",
        "FLAVA_HEARTBEAT_S": "0.5",
        "FLAVA_MAX_BACKLOG": "10000",
        "CHAOS_API_PORT": str(free_port()),
    }


def _start_worker(env, workdir: Path, redis_url: str, report: ChaosReport):
    """Spawn the worker; record the time until its first heartbeat after the spawn."""
    spawned = time.time()
    proc = spawn(["worker"], env, workdir / "worker.log")
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            beat = client.zscore(wire.Keys(PREFIX).workers, env["FLAVA_CONSUMER"])
        except redis.RedisError:
            beat = None
        if beat and beat > spawned:
            report.recovery_s.append(round(time.time() - spawned, 2))
            break
        time.sleep(0.1)
    client.close()
    return proc


def _kill_loop(cfg, env, workdir, server, worker, report):
    for k in range(cfg.kills):
        time.sleep(cfg.kill_every_s * random.Random(cfg.seed + k).uniform(0.6, 1.4))
        worker.kill()
        worker.wait()
        report.kills += 1
        if k == cfg.redis_restart_at_kill:
            server.stop()
            time.sleep(1.0)  # the API answers 503 meanwhile
            server.start()
            report.redis_restarts += 1
        worker = _start_worker(env, workdir, server.url, report)
        log.info("kill %d done, worker restarted", k + 1)
    return worker


def _settle(redis_url: str, accepted: list[str], timeout_s: float) -> None:
    """Wait until every accepted clip is learned or dead-lettered (or the timeout)."""
    client, keys = redis.Redis.from_url(redis_url), wire.Keys(PREFIX)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _states(client, keys, accepted)
        if all(s in (b"learned", b"dead") for s in states):
            break
        time.sleep(0.5)
    client.close()


def _states(client, keys, ids):
    pipe = client.pipeline(transaction=False)
    for cid in ids:
        pipe.hmget(keys.clip(cid), "state", "deliveries", "reason")
    return [row[0] for row in pipe.execute()] if ids else []


def _tally(redis_url: str, accepted: list[str], report: ChaosReport) -> None:
    client, keys = redis.Redis.from_url(redis_url), wire.Keys(PREFIX)
    report.accepted = len(accepted)
    pipe = client.pipeline(transaction=False)
    for cid in accepted:
        pipe.hmget(keys.clip(cid), "state", "deliveries", "reason")
        pipe.exists(keys.embedding(cid))
    rows = pipe.execute()
    for (state, deliveries, reason), has_embedding in zip(rows[::2], rows[1::2], strict=True):
        _count(report, state, int(deliveries or 1), reason, bool(has_embedding))
    client.close()


def _count(report: ChaosReport, state, deliveries: int, reason, has_embedding: bool) -> None:
    if state == b"learned" and has_embedding:
        report.learned += 1
    elif state == b"dead" and reason:
        report.dead_lettered += 1
        key = reason.decode().split(":")[0][:60]
        report.dead_reasons[key] = report.dead_reasons.get(key, 0) + 1
    else:
        report.lost += 1
    report.redeliveries += deliveries - 1
    report.clips_redelivered += deliveries > 1


def write_results(report: ChaosReport, cfg: ChaosConfig, out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(
        json.dumps({"config": asdict(cfg), "report": asdict(report)}, indent=2)
    )
    rec = sorted(report.recovery_s)
    lines = [
        "# Chaos run",
        "",
        f"Config: `{json.dumps(asdict(cfg))}`",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in asdict(report).items() if k != "recovery_s"]
    if rec:
        lines.append(f"| recovery_s median / max | {rec[len(rec) // 2]} / {rec[-1]} |")
    (out / "chaos.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=ChaosConfig.clips)
    p.add_argument("--kills", type=int, default=ChaosConfig.kills)
    p.add_argument("--kill-every", type=float, default=ChaosConfig.kill_every_s)
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: temp)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = ChaosConfig(clips=args.clips, kills=args.kills, kill_every_s=args.kill_every)
    if args.workdir:
        report = run_chaos(cfg, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="flava-chaos-") as tmp:
            report = run_chaos(cfg, Path(tmp))
    write_results(report, cfg)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
