"""Checkpoint overhead at the default interval, and replaying a tail after a SIGKILL.

For each preset, a FLAVA learner as the worker builds it (default replay memory, the worker's
default batch, selection on from the first step) steps on random batches. Blocks of one
checkpoint interval (``WorkerSettings.checkpoint_every`` updates) alternate, in one process:

- OFF: the interval's steps, no checkpoint;
- ON:  the worker's checkpoint at the interval's start (snapshot on the training thread: a
       tensor copy and the memory's new rows; weights, Adam state and the memory segment are
       written on the writer thread while the steps run), then the interval's steps, then
       waiting for the write if it is not done.

overhead = median ON block / median OFF block (target <= 1.05). The memory fills during the
run, so each ON block writes a segment of one interval of new rows (those of the OFF block
before it; an ON block's own rows count as saved, as the next checkpoint would save them):
the costly regime; once the memory is full, fewer rows are new each interval. One
more ON interval carries a compaction (the whole memory rewritten, due once the deltas reach
the memory's capacity in rows); its extra time is amortised over the intervals between two.

Replay: after the blocks, a fresh learner restores the newest checkpoint (weights + memory
segments, as the worker's restart does) and redoes one interval's steps (the tail a SIGKILL
leaves at worst), against that interval's steps the first time (target <= 2x).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.perfkit import Comparison, Stats, in_fresh_process

PRESETS = ("tiny", "small")


def _checkpointer(directory: Path, every: int, learner):
    import redis

    from worker.checkpointing import Checkpointer, CheckpointPolicy
    from worker.queue import ClipQueue
    from worker.settings import WorkerSettings

    keep = WorkerSettings().keep_checkpoints
    # acks are not measured here (one Redis pipeline per checkpoint): the queue is never used
    queue = ClipQueue(redis.Redis(port=1), None, "bench", 0)  # type: ignore[arg-type]
    return Checkpointer(
        directory,
        keep,
        CheckpointPolicy(every),
        queue,
        lambda fn, *a: fn(*a),
        learner.replay_memory(),
    )


def _snapshot(learner, preset_name: str):
    """What the worker's snapshot holds, minus the monitor's probe sets (a few MB)."""
    from worker.checkpoint import FORMAT

    def snapshot():
        updates = learner.step_count
        return f"1.{updates}", {
            "format": FORMAT,
            "learner": learner.state_dict(),
            "counters": {"updates": updates},
            "method": "flava",
            "preset": preset_name,
            "monitor": {},
        }

    return snapshot


def checkpoint_child(preset_name: str, blocks: int, every: int | None, batch: int | None) -> dict:
    """Alternating OFF/ON interval blocks, a compaction, then a restore + replay (seconds)."""
    from bench.perf import make_learner, random_batches
    from worker.checkpoint import load_newest
    from worker.core.learner import LearnerConfig
    from worker.settings import WorkerSettings

    defaults = WorkerSettings()
    every, batch = every or defaults.checkpoint_every, batch or defaults.batch_size
    learner = make_learner("flava", preset_name, LearnerConfig().memory_size)
    batches = random_batches(preset_name, batch, 4)
    out: dict = {"off": [], "on": [], "snapshot": [], "write": [], "every": every, "batch": batch}
    out["memory_rows"] = LearnerConfig().memory_size
    with tempfile.TemporaryDirectory(prefix="flava-ckpt-bench-") as tmp:
        ckpt = _checkpointer(Path(tmp), every, learner)
        snapshot = _snapshot(learner, preset_name)
        for j in range(every):  # warm-up, not timed (first-step allocations, caches)
            learner.step(batches[j % len(batches)])
            ckpt.updated()
        for i in range(2 * blocks):
            on = i % 2 == 1
            total, snap, write = _block(learner, ckpt, snapshot, batches, every, on)
            out["on" if on else "off"].append(total)
            if on:  # its rows would go into the next interval's checkpoint, not two intervals'
                ckpt.memory.forget_changes()
            if on:
                out["snapshot"].append(snap)
                out["write"].append(write)
        out["compact_factor"] = ckpt.segments.compact_factor
        full = ckpt.segments  # the next checkpoint's segment is the whole memory
        full.rows_since_full = int(full.compact_factor * full.capacity)
        out["compaction"] = _block(learner, ckpt, snapshot, batches, every, True)
        out["segments_mb"] = sum(p.stat().st_size for p in Path(tmp).glob("mem-*.pt")) / 2**20
        out["checkpoint_mb"] = max(p.stat().st_size for p in Path(tmp).glob("ckpt-*.pt")) / 2**20
        fresh = make_learner("flava", preset_name, LearnerConfig().memory_size)
        restorer = _checkpointer(Path(tmp), every, fresh)
        started = time.perf_counter()
        _, state, segments = load_newest(tmp, lambda p, exc: None, restorer.read_segments)
        restorer.load_learner(fresh, state["learner"], segments)
        out["restore"] = time.perf_counter() - started
        for j in range(every):
            fresh.step(batches[j % len(batches)])
        out["replay"] = time.perf_counter() - started
    return out


def _block(learner, ckpt, snapshot, batches, every: int, on: bool) -> tuple[float, float, float]:
    """One interval: (seconds in all, snapshot on the training thread, write on its thread).

    ON starts the checkpoint first (it is due: ``every`` updates since the last one), steps,
    then waits for the write: a write longer than the interval is counted."""
    started = time.perf_counter()
    snap = write = 0.0
    if on:
        ckpt.tick(snapshot, idle=False)
        snap = time.perf_counter() - started
    for j in range(every):
        learner.step(batches[j % len(batches)])
        ckpt.updated()
    if on:
        job = ckpt.in_flight
        ckpt.wait()
        write = job.seconds if job else 0.0
    return time.perf_counter() - started, snap, write


def bench_checkpoint(
    presets: tuple[str, ...], blocks: int, every: int | None = None, batch: int | None = None
) -> list[Comparison]:
    out = []
    for name in presets:
        r = in_fresh_process(checkpoint_child, name, blocks, every, batch)
        out += [_overhead(name, r), _replay(name, r)]
    return out


def _overhead(preset_name: str, r: dict) -> Comparison:
    on, off = Stats.of(r["on"], "s"), Stats.of(r["off"], "s")
    c = Comparison(
        "checkpoint-overhead",
        f"one checkpoint interval ({r['every']} updates of {r['batch']}) with its checkpoint vs "
        f"without, preset {preset_name}",
        "with checkpoint",
        on,
        "without",
        off,
        "<= 1.05",
    )
    rows = r["compact_factor"] * r["memory_rows"]  # new rows between two compactions
    per_ckpt = rows / (r["every"] * r["batch"])  # checkpoints per compaction
    interval = off.median
    c.extra.update(
        {
            "snapshot on the training thread": Stats.of(r["snapshot"], "s"),
            "write (writer thread)": Stats.of(r["write"], "s"),
            "checkpoint file (weights, Adam, counters)": f"{r['checkpoint_mb']:.1f} MiB",
            "memory segments on disk at the end": f"{r['segments_mb']:.1f} MiB",
            "interval with a compaction (whole memory rewritten)": (
                f"{r['compaction'][0]:.2f} s (snapshot {r['compaction'][1]:.2f} s, "
                f"write {r['compaction'][2]:.2f} s)"
            ),
            "compaction amortised over the intervals between two": (
                f"+{100 * (r['compaction'][0] - interval) / (per_ckpt * interval):.1f}% "
                f"(one every {per_ckpt:.0f} checkpoints)"
            ),
        }
    )
    c.notes.append(
        "blocks alternate OFF/ON in one process; ON starts the checkpoint at the block's start "
        "and waits for its write at the end, so a write longer than the interval is counted."
    )
    return c


def _replay(preset_name: str, r: dict) -> Comparison:
    first = Stats.of(r["off"], "s")
    c = Comparison(
        "tail-replay",
        f"restart after a SIGKILL: restore + redo one interval, vs that interval the first "
        f"time, preset {preset_name}",
        "restore + replay",
        Stats.of([r["replay"]], "s"),
        "interval",
        first,
        "<= 2.0",
    )
    c.extra["restore (weights + memory segments)"] = f"{r['restore']:.2f} s"
    return c
