"""Chaos run under the defaults: real processes, real faults, checked against the model.

A private redis-server (AOF, ``appendfsync everysec``), the API (``flava serve``) and the worker
(``flava worker``, default checkpoint policy) run as real processes. A client sends a drifting
synthetic stream (``tiny`` clips) and re-sends every clip ``/embed`` reports lost in a queue
reset. Meanwhile the fault loop, paced by the clips settled so far:

- SIGKILLs the worker (restarted at once, as a supervisor would) at random moments, some while
  it writes a checkpoint (the ledger grew, the file is not renamed yet) or right after one was
  durable (before its acks);
- SIGKILLs Redis and restarts it from its AOF; once deletes the AOF first (the data is lost);
- fills the checkpoint directory's disk (a tmpfs remounted down to its usage) for a while.

Then everything stops gracefully and the run is checked against the final checkpoint's ledger
chain (worker/checkpoint.py), not only against Redis: ``lost``, ``updates_lost`` and
``versions_reused`` must be 0 (bench/chaos_checks.py says how each is counted).

    python -m bench.chaos                    # the full run; writes bench/results/chaos.{json,md}
    python -m bench.chaos --clips 200 --kills 4 --workdir /tmp/chaos --no-write
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis

from bench import chaos_checks as checks
from bench.chaos_client import Client
from contract import wire
from flava.procs import RedisProcess, free_port, spawn, terminate
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"
PREFIX = "chaos"
CONSUMER = "chaos-worker"
MARK = "FLAVA_CHAOS_RUN"  # in the environment of every process the run starts (and theirs)
KILL_MODES = ("random", "mid-checkpoint", "after-durable")
DURABLE = " durable in "  # worker/checkpointing.py logs "checkpoint NAME durable in S s"
WAIT_FOR_CHECKPOINT_S = 20.0  # the default policy checkpoints at least every 15 s under load


@dataclass
class ChaosConfig:
    clips: int = 2000  # stream clips sent (tiny preset's synthetic clips)
    bad_every: int = 100  # every n-th upload is corrupted mid-file (0: none)
    kills: int = 20  # worker SIGKILLs, cycling through KILL_MODES
    redis_sigkills: int = 2  # Redis SIGKILLs, restarted from the AOF
    redis_data_loss: int = 1  # Redis SIGKILLs whose AOF is deleted before the restart
    disk_full_s: float = 40.0  # the checkpoint disk stays full this long (0: skip)
    window: int = 120  # the client keeps at most this many clips accepted and unsettled
    appendfsync: str = "everysec"
    tmpfs_mb: int = 4096  # the checkpoint tmpfs (tiny's memory segments reach ~2 GB here)
    seed: int = 0
    settle_timeout_s: float = 900.0  # how long the final drain may take


@dataclass
class Kill:
    mode: str
    at: float  # unix time of the SIGKILL
    during_checkpoint: bool  # a checkpoint write was under way (verified after the kill)
    recovery_s: float = -1.0  # kill -> next heartbeat or next clip learned


@dataclass
class Run:
    """What happened, as the fault loop saw it (the checks add what the data says)."""

    kills: list[Kill] = field(default_factory=list)
    redis_sigkills: int = 0
    redis_data_loss_restarts: int = 0
    worker_exits: list[int] = field(default_factory=list)  # exit codes of unplanned exits
    disk_full: dict | str = "skipped (disabled)"


# ---- the processes ------------------------------------------------------------------------
class Cluster:
    """redis-server, the API and the worker; the worker is one process per lifetime."""

    def __init__(self, cfg: ChaosConfig, workdir: Path, ckpt_dir: Path):
        self.workdir, self.ckpt_dir, self.run_id = workdir, ckpt_dir, secrets.token_hex(6)
        self.redis = RedisProcess(workdir / "redis", appendfsync=cfg.appendfsync)
        self.api_port = free_port()
        self.token = "chaos-token"
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.worker_logs: list[Path] = []
        self.worker_started = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        """The defaults a user runs: only where things are, never the checkpoint policy."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLAVA_")}
        return {
            **inherited,
            MARK: self.run_id,
            "FLAVA_REDIS_URL": self.redis.url,
            "FLAVA_KEY_PREFIX": PREFIX,
            "FLAVA_API_TOKEN": self.token,
            "FLAVA_CONSUMER": CONSUMER,
            "FLAVA_CHECKPOINT_DIR": str(self.ckpt_dir),
            "FLAVA_INPUTS_DIR": str(self.ckpt_dir.parent / "inputs"),
            "FLAVA_MODELS_DIR": str(self.ckpt_dir.parent / "models"),
        }

    def start(self) -> None:
        self.redis.start()
        self.api = spawn(
            ["serve", "--port", str(self.api_port)], self.env(), self.workdir / "api.log"
        )
        self.start_worker()

    def start_worker(self) -> None:
        path = self.workdir / f"worker-{len(self.worker_logs):02d}.log"
        self.worker_logs.append(path)
        self.worker = spawn(["worker"], self.env(), path)
        self.worker_started = time.time()

    @property
    def worker_log(self) -> Path:
        return self.worker_logs[-1]

    def kill_worker(self) -> float:
        assert self.worker is not None
        self.worker.kill()
        at = time.time()
        self.worker.wait()
        return at

    def sigkill_redis(self, lose_data: bool) -> None:
        assert self.redis.proc is not None
        self.redis.proc.kill()
        self.redis.proc.wait()
        if lose_data:
            for path in self.redis.workdir.rglob("*"):
                if path.is_file():
                    path.unlink()
        self.redis.start(timeout=60)

    def stop(self) -> None:
        """Gracefully: the worker checkpoints and acks what it holds, then the API, then Redis."""
        for proc in (self.worker, self.api):
            if proc is not None:
                terminate(proc, timeout=120)
        self.redis.stop()


# ---- the faults ---------------------------------------------------------------------------
def wait_for_write(ckpt_dir: Path, timeout_s: float) -> bool:
    """Wait until the checkpoint writer starts (the ledger grows, a temp file appears)."""
    ledger = ckpt_dir / "ledger.jsonl"
    size = ledger.stat().st_size if ledger.exists() else 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        grown = ledger.exists() and ledger.stat().st_size > size
        if grown or checks.checkpoint_temps(ckpt_dir):
            return True
        time.sleep(0.002)
    return False


def wait_for_log(path: Path, needle: str, timeout_s: float) -> bool:
    """Wait for a new line containing ``needle`` in the log at ``path``."""
    start = path.stat().st_size if path.exists() else 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            f.seek(start)
            if needle.encode() in f.read():
                return True
        time.sleep(0.01)
    return False


def kill_worker(cluster: Cluster, mode: str, rng: random.Random) -> Kill:
    """SIGKILL the worker at a moment chosen by ``mode``, restart it, time the recovery."""
    if mode == "mid-checkpoint" and wait_for_write(cluster.ckpt_dir, WAIT_FOR_CHECKPOINT_S):
        time.sleep(rng.uniform(0, 0.03))
    elif mode == "after-durable" and wait_for_log(
        cluster.worker_log, DURABLE, WAIT_FOR_CHECKPOINT_S
    ):
        time.sleep(rng.uniform(0, 0.2))
    else:
        mode = "random" if mode == "random" else f"random ({mode}: no checkpoint came)"
        time.sleep(rng.uniform(0, 3))
    at = cluster.kill_worker()
    kill = Kill(mode, at, checks.write_in_progress(cluster.ckpt_dir))
    cluster.start_worker()
    kill.recovery_s = wait_recovered(cluster, at)
    return kill


def wait_recovered(cluster: Cluster, since: float, timeout_s: float = 300.0) -> float:
    """Seconds from ``since`` to the worker's next heartbeat (the first one comes once it has
    restored its checkpoint and claimed a generation, ready to take clips); -1: none came."""
    r = redis.Redis.from_url(cluster.redis.url, socket_timeout=2)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            beat = _heartbeat(r)
            if beat > since:
                return round(beat - since, 2)
            time.sleep(0.1)
        return -1.0
    finally:
        r.close()


def _heartbeat(r: redis.Redis) -> float:
    try:
        return float(r.zscore(wire.Keys(PREFIX).workers, CONSUMER) or 0.0)
    except redis.RedisError:
        return 0.0


class CheckpointDisk:
    """The checkpoint directory on its own tmpfs, so it can be made full and freed again."""

    def __init__(self, path: Path, size_mb: int):
        self.path, self.size_mb = path, size_mb
        self.mounted = False

    def mount(self) -> str:
        """-> "" when mounted, else why not."""
        self.path.mkdir(parents=True, exist_ok=True)
        done = _sh("mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path))
        self.mounted = done.returncode == 0
        return "" if self.mounted else (done.stderr.strip() or "mount failed")

    def fill(self) -> int:
        """Shrink the tmpfs to what it holds: the next write gets ENOSPC. -> its size (KiB)."""
        for _ in range(50):  # usage moves while the worker writes: try again
            used_kb = -(-_used_bytes(self.path) // 4096) * 4
            if (
                _sh("mount", "-o", f"remount,size={max(used_kb, 4)}k", str(self.path)).returncode
                == 0
            ):
                return used_kb
            time.sleep(0.1)
        raise RuntimeError(f"could not shrink the tmpfs at {self.path}")

    def free(self) -> None:
        _sh("mount", "-o", f"remount,size={self.size_mb}m", str(self.path), check=True)

    def unmount(self) -> None:
        if self.mounted:
            _sh("umount", str(self.path))
            self.mounted = False


def _sh(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def _used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def disk_full(cluster: Cluster, disk: CheckpointDisk, hold_s: float, run: Run) -> dict:
    """Hold the checkpoint disk full for ``hold_s``; count failed writes; time the resume."""
    wait_recovered(cluster, cluster.worker_started)  # a worker up, its generation claimed
    logs, start = len(cluster.worker_logs) - 1, cluster.worker_log.stat().st_size
    size_kb = disk.fill()
    log.info("checkpoint disk full (%d KiB) for %.0f s", size_kb, hold_s)
    until = time.monotonic() + hold_s
    while time.monotonic() < until:
        watch_worker(cluster, run)
        time.sleep(0.5)
    disk.free()
    freed = time.monotonic()
    resumed = wait_for_log(cluster.worker_log, DURABLE, 60)
    failures = sum(
        _count_in(path, start if i == logs else 0, "acks stop until one succeeds")
        for i, path in enumerate(cluster.worker_logs[logs:], start=logs)
    )
    return {
        "held_s": hold_s,
        "size_kib": size_kb,
        "checkpoint_writes_failed": failures,
        "worker_exits_while_full": len(cluster.worker_logs) - 1 - logs,
        "acks_resumed_s": round(time.monotonic() - freed, 1) if resumed else None,
    }


def _count_in(path: Path, offset: int, needle: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().count(needle.encode())


# ---- the schedule -------------------------------------------------------------------------
def schedule(cfg: ChaosConfig, rng: random.Random) -> list[tuple[int, str]]:
    """(clips processed, fault) pairs spread over the run, in order."""
    faults = [f"worker:{KILL_MODES[k % len(KILL_MODES)]}" for k in range(cfg.kills)]
    faults += ["redis"] * cfg.redis_sigkills
    rng.shuffle(faults)
    for i, extra in enumerate(["reset"] * cfg.redis_data_loss + ["disk"] * (cfg.disk_full_s > 0)):
        faults.insert(len(faults) * (i + 1) // 3, extra)  # a third and two thirds in
    step = 0.85 * cfg.clips / (len(faults) + 1)
    return [(round(step * (i + rng.uniform(0.6, 1.2))), f) for i, f in enumerate(faults)]


def run_faults(cfg, cluster: Cluster, client: Client, disk: CheckpointDisk | None, run: Run):
    rng = random.Random(cfg.seed)
    for threshold, fault in schedule(cfg, rng):
        while client.progress() < threshold and not client.all_settled():
            watch_worker(cluster, run)
            time.sleep(0.2)
        watch_worker(cluster, run)
        apply_fault(fault, cfg, cluster, client, disk, run, rng)
        log.info("%s | %s", fault, progress(client, run))


def apply_fault(fault, cfg, cluster, client, disk, run: Run, rng: random.Random) -> None:
    if fault.startswith("worker:"):
        run.kills.append(kill_worker(cluster, fault.split(":")[1], rng))
    elif fault in ("redis", "reset"):
        cluster.sigkill_redis(lose_data=fault == "reset")
        run.redis_sigkills += 1
        run.redis_data_loss_restarts += fault == "reset"
    elif disk is not None and disk.mounted:
        run.disk_full = disk_full(cluster, disk, cfg.disk_full_s, run)


def watch_worker(cluster: Cluster, run: Run) -> None:
    """A worker that exited by itself is restarted (and reported)."""
    if cluster.worker is not None and cluster.worker.poll() is not None:
        run.worker_exits.append(cluster.worker.returncode)
        log.error("worker exited with %s: restarting it", cluster.worker.returncode)
        cluster.start_worker()


def progress(client: Client, run: Run) -> str:
    return (
        f"sent {client.sent}, accepted {len(client.accepted)}, processed {client.progress()}, "
        f"settled {client.settled()}, "
        f"kills {len(run.kills)}, redis kills {run.redis_sigkills}, "
        f"vanished {client.vanished}"
    )


# ---- the run ------------------------------------------------------------------------------
def run_chaos(cfg: ChaosConfig, workdir: Path) -> dict:
    """Run the chaos described by ``cfg`` in ``workdir``; -> the report (a flat dict)."""
    started, run = time.monotonic(), Run()
    ckpt_dir = workdir / "checkpoints"
    disk = _checkpoint_disk(cfg, ckpt_dir, run)
    try:
        report = _run(cfg, Cluster(cfg, workdir, ckpt_dir), disk, run)
    finally:
        if disk is not None:
            disk.unmount()
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def _run(cfg: ChaosConfig, cluster: Cluster, disk: CheckpointDisk | None, run: Run) -> dict:
    client = Client(cluster.api_url, cluster.token, cluster.redis.url, PREFIX, cfg)
    try:
        cluster.start()
        client.start()
        run_faults(cfg, cluster, client, disk, run)
        drain(cluster, client, run, cfg.settle_timeout_s)
        seen = checks.redis_side(cluster.redis.url, PREFIX, client)
    finally:
        client.stop()
        cluster.stop()
    return report_of(cfg, run, client, cluster, seen)


def _checkpoint_disk(cfg: ChaosConfig, ckpt_dir: Path, run: Run) -> CheckpointDisk | None:
    if cfg.disk_full_s <= 0:
        return None
    disk = CheckpointDisk(ckpt_dir, cfg.tmpfs_mb)
    why = disk.mount()
    if why:
        run.disk_full = f"skipped ({why})"
        log.warning("checkpoint disk not mounted: %s", why)
    return disk


def drain(cluster: Cluster, client: Client, run: Run, timeout_s: float) -> None:
    """Wait until the stream is sent and every accepted clip is settled."""
    deadline, last = time.monotonic() + timeout_s, 0.0
    while not client.all_settled():
        if time.monotonic() > deadline:
            log.error("drain timed out: %s", progress(client, run))
            return
        watch_worker(cluster, run)
        if time.monotonic() - last > 10:
            log.info("draining | %s", progress(client, run))
            last = time.monotonic()
        time.sleep(0.5)


def report_of(cfg: ChaosConfig, run: Run, client: Client, cluster: Cluster, seen: dict) -> dict:
    defaults = WorkerSettings()
    ledger = checks.ledger_side(cluster.ckpt_dir, client)
    recovery = sorted(k.recovery_s for k in run.kills if k.recovery_s >= 0)
    return {
        **client.figures(),
        "kills": len(run.kills),
        "kills_during_checkpoint": sum(k.during_checkpoint for k in run.kills),
        "kill_modes": dict(Counter(k.mode for k in run.kills)),
        "worker_exits_unplanned": run.worker_exits,
        "redis_sigkills": run.redis_sigkills,
        "redis_data_loss_restarts": run.redis_data_loss_restarts,
        "appendfsync": cfg.appendfsync,
        "checkpoint_every": defaults.checkpoint_every,
        "checkpoint_interval_s": defaults.checkpoint_interval_s,
        "disk_full": run.disk_full,
        **ledger,
        **checks.version_side(cluster.worker_logs, seen["generations"]),
        "recovery_s": checks.p50_max(recovery),
        "orphan_processes": checks.orphans(MARK, cluster.run_id),
        "config": asdict(cfg),
        "code": _code_version(),
    }


def _code_version() -> str:
    """The commit the processes ran (``+dirty``: with uncommitted changes to the code)."""
    git = ["git", "-C", str(Path(__file__).parent)]
    head = _sh(*git, "rev-parse", "--short", "HEAD").stdout.strip()
    dirty = _sh(*git, "status", "--porcelain", "--", "worker", "service", "contract", "flava")
    return head + ("+dirty" if dirty.stdout.strip() else "")


def write_results(report: dict, out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Chaos run", "", "`python -m bench.chaos` (bench/chaos.py)", ""]
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v)} |" for k, v in report.items() if k != "config"]
    lines += ["", f"Config: `{json.dumps(report['config'])}`"]
    (out / "chaos.md").write_text("\n".join(lines) + "\n")


OPTIONS = ("clips", "kills", "redis_sigkills", "redis_data_loss", "disk_full_s", "window", "seed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in OPTIONS:
        default = getattr(ChaosConfig, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: temp)")
    p.add_argument("--no-write", action="store_true", help="print, do not write bench/results")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop everything on SIGTERM too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = ChaosConfig(**{name: getattr(args, name) for name in OPTIONS})
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run_chaos(cfg, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="flava-chaos-") as tmp:
            report = run_chaos(cfg, Path(tmp))
    if not args.no_write:
        write_results(report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
