"""The chaos run's checks: what the model, the versions and the process table say afterwards.

- ``updates_lost``: clips the client saw ``learned`` that are missing from the final
  checkpoint's ledger chain (worker/checkpoint.py: ``ledger_chain``). Must be 0.
- ``trained_twice``: clip ids on the chain more than once, except clips the client re-sent
  after a data-losing Redis restart: those are counted as ``retrained_after_reset``.
- ``versions_reused``: a version "G.N" names one weight state only if no generation G was
  claimed by two worker process lifetimes (each logs "generation G starts"), and every
  published embedding's G was claimed by one. Counts the generations that break either.
- ``orphan_processes``: processes still running after the run stopped everything whose
  environment carries the run's mark (decoders, forkservers, resource trackers of killed
  workers). Must be 0; they are SIGKILLed after being counted.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import redis

from contract import wire
from worker.checkpoint import (
    LEDGER,
    checkpoint_name,
    latest_checkpoint,
    ledger_chain,
    load_checkpoint,
)

log = logging.getLogger(__name__)
GENERATION_LINE = re.compile(rb"generation (\d+) starts at version")


# ---- checkpoint writes --------------------------------------------------------------------
def checkpoint_temps(ckpt_dir: Path) -> list[str]:
    """Temp files of checkpoints being written (``.ckpt-*.tmp``)."""
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return []
    return [n for n in names if n.startswith(".ckpt-") and n.endswith(".tmp")]


def write_in_progress(ckpt_dir: Path) -> bool:
    """After a kill: was a checkpoint being written (a temp file, or the newest ledger line's
    checkpoint file never renamed into place)?"""
    if checkpoint_temps(ckpt_dir):
        return True
    lines = _ledger_lines(ckpt_dir)
    if not lines:
        return False
    g, n = (int(x) for x in _version_of(lines[-1]).split("."))
    return not (ckpt_dir / checkpoint_name(g, n)).exists()


def _ledger_lines(ckpt_dir: Path) -> list[str]:
    path = ckpt_dir / LEDGER
    return [x for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _version_of(line: str) -> str:
    return re.search(r'"version": "([0-9.]+)"', line).group(1)  # type: ignore[union-attr]


# ---- Redis, before it stops ---------------------------------------------------------------
def redis_side(redis_url: str, prefix: str, client) -> dict:
    """The generations of the published embeddings of the clips the client saw learned."""
    r, keys = redis.Redis.from_url(redis_url), wire.Keys(prefix)
    ids = list(client.learned)
    pipe = r.pipeline(transaction=False)
    for cid in ids:
        pipe.hget(keys.embedding(cid), "model_version")
    versions = [v.decode() for v in pipe.execute() if v] if ids else []
    r.close()
    return {"generations": Counter(wire.ModelVersion.parse(v).generation for v in versions)}


# ---- the ledger ---------------------------------------------------------------------------
def ledger_side(ckpt_dir: Path, client) -> dict:
    """Every learned clip in the final model? Trained twice? (see the module docstring)"""
    newest = latest_checkpoint(ckpt_dir)
    if newest is None:
        return {"updates_lost": len(client.learned), "ledger_error": "no checkpoint"}
    state = load_checkpoint(newest)
    try:
        chain = ledger_chain(ckpt_dir, state["ledger"]["hash"])
    except ValueError as exc:
        return {"updates_lost": len(client.learned), "ledger_error": str(exc)}
    counts = Counter(cid for seg in chain for cid in seg.clip_ids)
    twice = {cid: n - 1 for cid, n in counts.items() if n > 1}
    versions = [wire.ModelVersion.parse(seg.version) for seg in chain]
    return {
        "updates_lost": sum(cid not in counts for cid in client.learned),
        "trained_twice": sum(n for cid, n in twice.items() if cid not in client.resent),
        "retrained_after_reset": sum(n for cid, n in twice.items() if cid in client.resent),
        "ledger_clips": sum(counts.values()),
        "ledger_checkpoints": len(chain),
        "ledger_versions_ordered": all(a < b for a, b in zip(versions, versions[1:], strict=False)),
        "final_version": chain[-1].version if chain else None,
    }


# ---- versions -----------------------------------------------------------------------------
def version_side(worker_logs: list[Path], embedding_generations: Counter) -> dict:
    """Each generation claimed by one process lifetime; each embedding's generation claimed."""
    claimed: dict[int, list[int]] = {}
    for lifetime, path in enumerate(worker_logs):
        for g in GENERATION_LINE.findall(path.read_bytes()):
            claimed.setdefault(int(g), []).append(lifetime)
    shared = [g for g, lives in claimed.items() if len(lives) > 1]
    unclaimed = [g for g in embedding_generations if g not in claimed]
    return {
        "versions_reused": len(shared) + len(unclaimed),
        "worker_lifetimes": len(worker_logs),
        "generations_claimed": len(claimed),
        "embedding_generations": len(embedding_generations),
    }


def p50_max(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {"p50": None, "max": None, "n": 0}
    return {"p50": values[len(values) // 2], "max": values[-1], "n": len(values)}


# ---- processes ----------------------------------------------------------------------------
def orphans(mark: str, run_id: str, grace_s: float = 15.0) -> int:
    """Processes of this run still alive once everything was stopped (counted, then killed)."""
    deadline = time.monotonic() + grace_s
    while (left := _marked(mark, run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid, cmd in left.items():
        log.error("left behind: pid %d %s", pid, cmd[:120])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def _marked(mark: str, run_id: str) -> dict[int, str]:
    """pid -> command line of the live processes whose environment has ``mark=run_id``."""
    needle, found = f"{mark}={run_id}".encode(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            proc = Path("/proc", entry)
            if needle in (proc / "environ").read_bytes().split(b"\0") and _alive(proc):
                found[int(entry)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def _alive(proc: Path) -> bool:
    """Not a zombie (a zombie has exited; only its exit status waits to be read)."""
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
