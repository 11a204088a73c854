"""When to checkpoint, and acking what a checkpoint made durable.

The worker publishes a clip's embedding right after the update that included it, then
hands the delivery to the :class:`Checkpointer` (``record``). A checkpoint snapshots the
state on the training thread (a tensor copy), writes it on a background thread
(worker/checkpoint.py) and, once the file is durable, acks every clip recorded before the
snapshot: state ``learned`` (``probed`` for probes). A crash before that re-delivers them.

Policy (:class:`CheckpointPolicy`): after ``every_updates`` updates, after ``every_s``
seconds with clips waiting, or as soon as the stream goes idle with clips waiting, whichever
comes first. A failed write (disk full, unwritable directory) keeps the clips waiting,
stops acking, raises ``flava_checkpoint_failing`` and is retried every ``retry_s``.

In a rank group (worker/ranks.py) every rank checkpoints at the same versions and its acks
are held (``hold_acks``) until every rank's checkpoint of the version is durable
(``release``): a restart restores the newest version all ranks hold.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker import telemetry
from worker.checkpoint import (
    GENESIS,
    CheckpointJob,
    CheckpointWriter,
    LedgerSegment,
    checkpoint_name,
    detached_copy,
)
from worker.core.learner import Learner
from worker.core.memory import ReplayMemory
from worker.queue import ClipQueue, Delivery
from worker.segments import MemorySegments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Checkpoint after ``every_updates`` updates, ``every_s`` seconds or an idle stream."""

    every_updates: int = 50
    every_s: float = 15.0  # bounds ingest -> learned when updates are slow (base on a CPU)
    on_idle: bool = True  # a quiet stream acks what it holds at once
    retry_s: float = 5.0  # after a failed write

    @classmethod
    def from_settings(cls, settings) -> CheckpointPolicy:
        """From WorkerSettings' ``checkpoint_every``/``_interval_s``/``_on_idle``."""
        return cls(
            settings.checkpoint_every, settings.checkpoint_interval_s, settings.checkpoint_on_idle
        )

    def due(self, updates: int, waiting: int, since_s: float, idle: bool) -> bool:
        if updates >= self.every_updates:
            return True
        return waiting > 0 and (since_s >= self.every_s or (idle and self.on_idle))


@dataclass
class Tail:
    """What was published since the last snapshot: it is acked once a checkpoint holds it."""

    settles: list[tuple[Delivery, str]] = field(default_factory=list)  # (delivery, final state)
    trained: list[str] = field(default_factory=list)  # clip ids of training clips, in order

    def __len__(self) -> int:
        return len(self.settles)


class Checkpointer:
    """Owns the checkpoint directory's writer, the ledger head and the clips awaiting an ack.

    ``snapshot()`` -> the state to save (the runner's learner, counters, monitor);
    ``retry`` calls a Redis operation until it succeeds (the runner's backoff). A replay
    ``memory`` is not in the snapshot: its changes go to segment files (worker/segments.py)
    and the learner state's ``extra.memory`` lists them."""

    def __init__(
        self,
        directory: str | Path,
        keep: int,
        policy: CheckpointPolicy,
        queue: ClipQueue,
        retry: Callable[..., Any],
        memory: ReplayMemory | None = None,
    ):
        self.policy = policy
        self.queue = queue
        self.retry = retry
        self.writer = CheckpointWriter(directory, keep)
        self.memory = memory
        capacity = memory.capacity if memory is not None else 0
        self.segments = MemorySegments(Path(directory), capacity)
        self.head = GENESIS  # ledger hash of the newest durable checkpoint
        self.tail = Tail()
        self.in_flight: CheckpointJob | None = None
        self.updates_since = 0
        self.error = ""  # why the last write failed; "" once one succeeds
        self._last = time.monotonic()  # last snapshot (or failed attempt)
        self.durable = -1  # version_key of the newest durable snapshot; -1: none yet
        self.hold_acks = False  # a rank group's: ack only what ``release`` allows
        self.held: list[CheckpointJob] = []  # durable here, not yet on every rank

    # ---- what the loop tells it ---------------------------------------------------------
    def record(self, delivery: Delivery, state: str, trained: bool) -> None:
        """A published clip (or a second entry of one): acked as ``state`` once a checkpoint
        holds its update; ``trained`` ones go into the ledger."""
        self.tail.settles.append((delivery, state))
        if trained:
            self.tail.trained.append(delivery.entry.clip_id)
        telemetry.UNACKED.set(self.waiting)

    def holds(self, clip_id: str) -> bool:
        """Whether ``clip_id`` was published by this process and waits for a checkpoint."""
        waiting = self.tail.settles + (self.in_flight.settles if self.in_flight else [])
        waiting += [item for job in self.held for item in job.settles]
        return any(d.entry.clip_id == clip_id for d, _ in waiting)

    def updated(self) -> None:
        self.updates_since += 1

    @property
    def waiting(self) -> int:
        """Clips published and not yet acked (in the tail or in the write in flight)."""
        held = sum(len(job.settles) for job in self.held)
        return len(self.tail) + (len(self.in_flight.settles) if self.in_flight else 0) + held

    def forget_tail(self) -> None:
        """After Redis lost its data the held entries are gone: nothing left to ack."""
        self.tail = Tail()
        self.held = []
        if self.in_flight is not None:
            self.in_flight.settles.clear()

    # ---- restoring ------------------------------------------------------------------------
    def read_segments(self, state: dict) -> list[dict] | None:
        """The memory segments a checkpoint lists, read (raises if one is missing)."""
        listed = state["learner"].get("extra", {}).get("memory", {}).get("segments")
        return None if listed is None else self.segments.load(listed)

    def load_learner(self, learner: Learner, saved: dict, segments: list[dict] | None) -> None:
        """Weights, optimizer and method state; the memory from its segments, if listed
        (a format-1 checkpoint holds the memory whole)."""
        memory = learner.replay_memory()
        if segments is None or memory is None:
            learner.load_state_dict(saved)
            return
        listed = saved["extra"]["memory"]["segments"]
        self.segments.restore(memory, listed, segments)
        saved["extra"]["memory"] = memory.state_dict()
        learner.load_state_dict(saved)
        memory.forget_changes()  # already on disk: the next segment starts from here

    # ---- the policy -----------------------------------------------------------------------
    def tick(self, snapshot: Callable[[], tuple[str, dict]], idle: bool) -> None:
        """Ack what became durable; start a checkpoint if one is due and none is in flight."""
        self._settle(wait=False)
        if self.due(idle):
            self._start(*snapshot())

    def collect(self) -> None:
        """Take in a write that finished (ack its clips, or hold them); never waits."""
        self._settle(wait=False)

    def due(self, idle: bool) -> bool:
        """Whether the policy asks for a checkpoint now (none in flight, no retry pending)."""
        if self.in_flight is not None:
            return False
        since = time.monotonic() - self._last
        if self.error and since < self.policy.retry_s:
            return False
        return self.policy.due(self.updates_since, len(self.tail), since, idle)

    def start_now(self, snapshot: Callable[[], tuple[str, dict]]) -> None:
        """A checkpoint of the current version, after the one in flight (a rank group's
        agreed checkpoint); nothing to write when nothing changed since the last."""
        self._settle(wait=True)
        if len(self.tail) or self.updates_since:
            self._start(*snapshot())

    def release(self, upto: int) -> None:
        """Ack the held snapshots of versions up to ``upto`` (a version_key): every rank
        has a durable checkpoint of ``upto`` (docs/distributed.md)."""
        ready = [job for job in self.held if version_key(job.segment.version) <= upto]
        self.held = [job for job in self.held if job not in ready]
        for job in ready:
            self._ack(job.settles)

    def wait(self) -> None:
        """Wait for the checkpoint in flight (if any) and ack what it made durable."""
        self._settle(wait=True)

    def flush(self, snapshot: Callable[[], tuple[str, dict]]) -> bool:
        """Checkpoint now and wait for it (shutdown, tests); True if everything is acked."""
        self._settle(wait=True)
        if len(self.tail) or self.updates_since:
            self._start(*snapshot())
            self._settle(wait=True)
        return not self.error and self.waiting == 0

    # ---- writing and settling -------------------------------------------------------------
    def _start(self, version: str, state: dict) -> None:
        """Snapshot on this thread (tensor copies), write on the writer's thread."""
        started = time.perf_counter()
        segment = LedgerSegment.after(self.head, version, self.tail.trained)
        generation, updates = (int(x) for x in version.split("."))
        name = checkpoint_name(generation, updates)
        job = CheckpointJob(name, {}, segment, settles=self.tail.settles)
        if self.memory is not None:  # its changes as a segment; the state lists the segments
            listed = self.segments.take(self.memory, version)
            state["learner"]["extra"]["memory"] = {"segments": listed}
            pending = list(self.segments.unwritten)
            job.before = lambda: self.segments.write(pending)
            job.after = lambda kept: self.segments.collect(name, listed, kept)
            job.memory_segments = pending
        job.state = {
            **detached_copy(state),
            "ledger": vars(segment),
            "settles": [[d.entry.clip_id, s] for d, s in self.tail.settles],
        }
        self.tail, self.updates_since, self._last = Tail(), 0, time.monotonic()
        self.in_flight = job
        self.writer.submit(job)
        telemetry.CHECKPOINT_SNAPSHOT_SECONDS.observe(time.perf_counter() - started)

    def _settle(self, wait: bool) -> None:
        job = self.writer.finished(wait=wait) if self.in_flight is not None else None
        if job is None:
            return
        self.in_flight = None
        if job.error is not None:
            self._failed(job)
            return
        self.head = job.segment.hash
        self.error = ""
        self.segments.written(job.memory_segments)
        telemetry.CHECKPOINTS.labels("written").inc()
        telemetry.CHECKPOINT_SECONDS.observe(job.seconds)
        telemetry.CHECKPOINT_FAILING.set(0)
        telemetry.DURABLE_VERSION.set(int(job.segment.version.split(".")[1]))
        log.info("checkpoint %s durable in %.2f s", job.name, job.seconds, extra=_log_fields(job))
        self.durable = version_key(job.segment.version)
        if self.hold_acks:
            self.held.append(job)
        else:
            self._ack(job.settles)

    def _failed(self, job: CheckpointJob) -> None:
        """Keep the job's clips waiting (in front of newer ones); the next try writes all."""
        self.error = f"{type(job.error).__name__}: {job.error} ({_free(self.writer.directory)})"
        log.error(
            "checkpoint %s failed (%s): acks stop until one succeeds",
            job.name,
            self.error,
            extra=_log_fields(job),
        )
        telemetry.CHECKPOINTS.labels("failed").inc()
        telemetry.CHECKPOINT_FAILING.set(1)
        self.tail = Tail(job.settles + self.tail.settles, job.segment.clip_ids + self.tail.trained)
        self.updates_since += 1  # the failed snapshot's updates still need a checkpoint

    def _ack(self, settles: list[tuple[Delivery, str]]) -> None:
        if settles:
            self.retry(self.queue.ack_many, settles)
        now = time.time()
        for d, state in settles:
            telemetry.CLIPS.labels(state).inc()  # learned | probed: counted once durable
            telemetry.LEARNED_SECONDS.observe(max(0.0, now - d.entry.received_at))
        telemetry.UNACKED.set(self.waiting)


def version_key(version: str) -> int:
    """ "G.N" -> one integer ordered as versions are (N < 10**10, as in checkpoint names)."""
    generation, updates = (int(x) for x in version.split("."))
    return generation * 10**10 + updates


def _free(directory: Path) -> str:
    """Free space where checkpoints go: a full disk is the usual cause of a failed write."""
    try:
        return f"{shutil.disk_usage(directory).free} bytes free on {directory}"
    except OSError as exc:
        return f"{directory}: {exc.strerror}"


def _log_fields(job: CheckpointJob) -> dict[str, object]:
    """The checkpoint's model ``version`` and ``step`` as log fields (contract/logs.py)."""
    counters = job.state.get("counters", {})
    return {"version": job.segment.version, "step": counters.get("step"), "checkpoint": job.name}
