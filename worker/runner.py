"""The worker process: consume the clip stream, learn online, publish versioned embeddings.

One iteration: take a batch of deliveries (read ahead during the previous update, or read
now) -> drop duplicates and over-delivered entries -> collect the decoded clips -> read the
next batch and start decoding it -> one update of the learner on the batch's training clips
-> embed every clip -> publish the embeddings (state ``embedded``) -> checkpoint when due,
and ack what the newest durable checkpoint holds (state ``learned``) -> heartbeat, metrics.

The guarantee (docs/versions.md): an entry leaves the pending list only once an update that
includes it is in a durable checkpoint, so a crash replays exactly the un-checkpointed tail;
every process start is a new generation, so a version name never names two weight states.

Overlap: clips decode in separate processes (worker/decoding.py), so the next batch's bytes
are fetched and decoded while the current update runs, instead of adding to it. A batch is
read ahead only in the steady state: not while re-reading own pending entries (they would
include the batch in hand), not when the step limit or a stop is near. On stop, a batch read
ahead is processed too, so nothing taken is left pending.

A clip that cannot be decoded goes to the dead-letter stream with its reason and the worker
keeps going. Redis outages and transient replies (OOM, READONLY, BUSY) are retried with
backoff; ``NOGROUP`` (Redis lost its data) recreates the group and goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch
from redis.exceptions import RedisError

from contract import wire
from contract.faults import lost_group
from worker import telemetry, uploads
from worker.builtin import resolve_init_weights
from worker.checkpoint import (
    FORMAT,
    GENESIS,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_newest,
    next_generation,
    remove_stale_temps,
    version_of,
)
from worker.checkpointing import Checkpointer, CheckpointPolicy
from worker.core.learner import Batch, Learner, LearnerConfig, StepStats, build_learner
from worker.core.media import Clip
from worker.core.model import preset
from worker.decoding import DecodePool, PendingDecode
from worker.inputs import InputStore
from worker.lease import Lease
from worker.models import ModelPublisher  # published snapshots for the embedders
from worker.monitoring import MonitorConfig, StreamMonitor
from worker.publishing import Stamp, embeddings_for, final_state
from worker.queue import ClipQueue, Delivery, transient
from worker.settings import WorkerSettings
from worker.warmstart import warm_start

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """What survives a restart through the checkpoint; ``generation`` is this process's own."""

    updates: int = 0  # applied updates in the weights' lineage: N of the version G.N
    step: int = 0  # updates attempted, skipped ones included
    clips_learned: int = 0
    clips_probed: int = 0
    clips_dead: int = 0
    generation: int = 0  # G of G.N: claimed anew by every process start

    @property
    def version(self) -> str:
        return f"{self.generation}.{self.updates}"

    @classmethod
    def restored(cls, saved: dict) -> Counters:
        saved = dict(saved)
        if "version" in saved:  # format 1 called the update count "version"
            saved["updates"] = saved.pop("version")
        return cls(**saved)


@dataclass
class Fetched:
    """A batch read from the stream whose clips are decoding in the decode processes."""

    deliveries: list[Delivery]
    decodes: list[PendingDecode]


@dataclass
class BatchReport:
    learned: int = 0
    probed: int = 0
    dead: int = 0
    duplicates: int = 0
    stats: StepStats | None = None
    reasons: list[str] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Worker:
    """A learner bound to a Redis consumer; ``run`` loops until ``stop`` is set."""

    def __init__(
        self, settings: WorkerSettings, client: redis.Redis, learner: Learner | None = None
    ):
        self.settings = settings
        self.queue = ClipQueue(
            client,
            wire.Keys(settings.key_prefix),
            settings.consumer,
            settings.claim_min_idle_ms,
            settings.dead_blob_ttl_s,
        )
        self.lease = Lease(client, self.queue.keys.lease, settings.consumer, settings.lease_ttl_s)
        self.model_cfg = preset(settings.preset)
        if settings.nce_weight is not None:
            self.model_cfg = dataclasses.replace(self.model_cfg, nce_weight=settings.nce_weight)
        self.media_cfg = self.model_cfg.media()
        self.learner = learner or build_learner(
            settings.method,
            self.model_cfg,
            LearnerConfig(seed=settings.seed, lr=settings.lr, der_alpha=settings.der_alpha),
            device=str(pick_device(settings.device)),
        )
        self.counters = Counters()
        self.inputs = InputStore.from_settings(settings)
        self.pool = DecodePool(
            settings.decode_processes,
            self.media_cfg,
            settings.decode_timeout_s,
            settings.decode_nice,
        )
        self.checkpoints = self._new_checkpointer()
        self.durable_settles: dict[str, str] = {}  # clip id -> state, held by the restored ckpt
        self._ahead: Fetched | None = None  # the next batch, read during the current update
        self._stop: threading.Event | None = None
        self._last_heartbeat = 0.0
        self._selection_on = False  # FLAVA: importance selection drove the last step
        self.control = wire.Control()  # what an operator asked ({p}:control), read each iteration
        self.monitor = self._new_monitor()
        self.models = ModelPublisher.from_settings(settings, self.queue.redis)  # worker/models.py

    def _new_monitor(self) -> StreamMonitor:
        cfg = MonitorConfig.from_settings(self.settings)
        return StreamMonitor(cfg, self.learner, self.queue.redis, self.queue.keys)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Take the lease, restore the newest checkpoint, claim a generation, join the group."""
        self._retry(self.queue.ensure_group)
        self._retry(self.lease.take)
        remove_stale_temps(self.settings.checkpoint_dir)
        resumed = self.restore()
        published = self._retry(self.queue.published_generation)
        self.counters.generation = self._claim_generation(published)
        log.info(
            "generation %d starts at version %s",
            self.counters.generation,
            self.version,
            extra=self._log_fields(generation=self.counters.generation),
        )
        if resumed:  # the restored forgetting figures, before the first batch comes
            self.monitor.publish(self.counters.step, self.version)
        self._retry(self.queue.claim_own_pending)
        self._retry(uploads.sweep, self.queue.redis, self.queue.keys, self.settings.blob_dir)
        self._retry(self.heartbeat, force=True)

    @property
    def version(self) -> str:
        return self.counters.version

    def _claim_generation(self, published: int) -> int:
        """A new generation, durably on disk before anything is published; while the
        checkpoint directory cannot be written (disk full) wait for it, not exit (a
        supervisor would only restart-loop the worker)."""
        delay = 1.0
        while True:
            try:
                return next_generation(self.settings.checkpoint_dir, published)
            except OSError as exc:
                telemetry.CHECKPOINT_FAILING.set(1)
                log.error("cannot claim a generation (%s): retrying in %.0f s", exc, delay)
                if self._stop is not None and self._stop.is_set():
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set or ``max_steps`` updates were taken, then checkpoint."""
        self.start()
        self._stop = stop
        try:
            while not stop.is_set() and not self._reached_max_steps():
                self._retry(self.iterate, stop=stop)
            if self._ahead is not None:  # taken from the stream: finish it, leave nothing pending
                self._retry(self.iterate, stop=stop)
        finally:
            self.settle()
            self._remove_finished_uploads()
            self.pool.shutdown()
            self._retry(self.lease.release, stop=stop)
            log.info("worker stopped at version %s", self.version)

    def settle(self) -> bool:
        """Checkpoint now and ack everything published; True if nothing is left waiting."""
        return self.checkpoints.flush(self._snapshot)

    def iterate(self) -> BatchReport | None:
        try:
            return self._iteration()
        except RedisError as exc:
            if transient(exc) or lost_group(exc):
                self._ahead = None  # its entries stay pending and are re-read with the rest
                self.queue.reread_pending()  # what was delivered before the fault comes first
            raise

    def _iteration(self) -> BatchReport | None:
        """Obey the operator, learn a batch (or wait for one), checkpoint when due."""
        if self._obey_control():  # paused: no batch taken, acks and heartbeats go on
            return None
        fetched, self._ahead = self._ahead or self._fetch(self.settings.block_ms), None
        report = self.process(fetched) if fetched.deliveries else None
        if report is None:
            self.monitor.catch_up(self.counters.step, self.version)
        self.checkpoints.tick(self._snapshot, idle=report is None)
        self._remove_finished_uploads()
        if report is None and self.inputs is not None:
            self.inputs.maybe_sweep()  # retention, when the stream is idle
        self.heartbeat()
        return report

    def _fetch(self, block_ms: int | None) -> Fetched:
        """Read up to a batch of deliveries and start decoding their clips."""
        deliveries = self.queue.next_batch(self.settings.batch_size, block_ms)
        blobs = self.queue.fetch_blobs(deliveries, Path(self.settings.blob_dir))
        starts = [d.entry.start_s if d.entry.window else None for d in deliveries]
        return Fetched(deliveries, list(map(self.pool.submit, blobs, starts)))

    def _remove_finished_uploads(self) -> None:
        """Remove the files of uploads whose last window was acked or dead-lettered."""
        finished, self.queue.finished_uploads = self.queue.finished_uploads, []
        uploads.remove(self.settings.blob_dir, finished)

    def _read_ahead(self) -> None:
        """Fetch the next batch (no blocking) so it decodes while this one is learned."""
        stop_near = self._stop is not None and self._stop.is_set()
        last_step = 0 < self.settings.max_steps <= self.counters.step + 1
        asked = self.control.paused or bool(self.control.rollback_id)  # the batch in hand first
        if self.queue.rereading or stop_near or last_step or asked:
            return
        fetched = self._fetch(None)
        self._ahead = fetched if fetched.deliveries else None

    def _reached_max_steps(self) -> bool:
        return 0 < self.settings.max_steps <= self.counters.step

    # ---- one batch -------------------------------------------------------------------
    def process(self, fetched: Fetched) -> BatchReport:
        """Learn from a batch of deliveries and publish each embedding (or dead-letter it)."""
        started = time.perf_counter()
        report = BatchReport()
        fresh = self._drop_settled(fetched, report)
        clips = self._decoded(fresh, report)
        self._read_ahead()
        before = Stamp(self.version, self.counters.step)
        report.stats = self._learn(clips)  # a rank group's step even without clips
        if clips:
            emb_a, emb_v = self._publish(clips, report, before)
            self.monitor.after_batch(
                [d.entry for d, _ in clips],
                [c for _, c in clips],
                emb_a,
                emb_v,
                self.counters.step,
                self.version,
            )
        telemetry.BATCH_SECONDS.observe(time.perf_counter() - started)
        self.counters.clips_dead += report.dead
        return report

    def _drop_settled(
        self, fetched: Fetched, report: BatchReport
    ) -> list[tuple[Delivery, PendingDecode]]:
        """Dead-letter entries that failed too often; ack clips already settled.

        Checked when the batch is processed, not when it was read: a clip of the batch read
        ahead may have been learned by the update that just finished. Failures are the
        deliveries that did not end in an update (``trained``), so re-deliveries of an
        un-checkpointed tail after a crash do not count."""
        fresh, settled = [], []
        states = self.queue.clip_states(fetched.deliveries)
        for d, pending, (state, trained) in zip(
            fetched.deliveries, fetched.decodes, states, strict=True
        ):
            if state in ("learned", "probed", "dead"):
                settled.append((d, state))
            elif d.entry.clip_id in self.durable_settles:  # in the restored checkpoint
                settled.append((d, self.durable_settles[d.entry.clip_id]))
            elif state == "embedded" and self.checkpoints.holds(d.entry.clip_id):
                self.checkpoints.record(d, final_state(d), trained=False)  # a second entry
                report.duplicates += 1
            elif d.deliveries - trained > self.settings.max_deliveries:
                self._dead(d, f"delivered {d.deliveries - trained} times without an update", report)
            else:
                fresh.append((d, pending))
        if settled:
            self._retry(self.queue.ack_many, settled)
            report.duplicates += len(settled)
            telemetry.CLIPS.labels("duplicate").inc(len(settled))
        return fresh

    def _decoded(
        self, fresh: list[tuple[Delivery, PendingDecode]], report: BatchReport
    ) -> list[tuple[Delivery, Clip]]:
        """-> [(delivery, Clip)] for the clips that decode; the rest are dead-lettered."""
        decoded = []
        for d, pending in fresh:
            result = self.pool.result(pending)
            if isinstance(result, str):
                self._dead(d, result, report)
                continue
            telemetry.DECODE_SECONDS.observe(result.seconds)
            decoded.append((d, result.clip()))
        if self.inputs is not None:
            for d, clip in decoded:
                self.inputs.put(d.entry.clip_id, d.entry.task, self.settings.preset, clip)
        return decoded

    def _learn(self, clips: list[tuple[Delivery, Clip]]) -> StepStats | None:
        train = [c for d, c in clips if d.entry.purpose == "train"]
        if not train:
            return None
        self.learner.take_step_embeddings()  # drop a leftover: a stale one is never published
        return self._applied(self.learner.step(_batch(train)))

    def _applied(self, stats: StepStats) -> StepStats:
        """Count a step the learner took (or skipped), publish a model when due."""
        self.counters.step += 1
        if stats.skipped:
            telemetry.STEPS.labels("skipped_nonfinite").inc()
            log.warning("non-finite loss at step %d: update skipped", self.counters.step)
        else:
            self.counters.updates += 1
            self.checkpoints.updated()
            telemetry.STEPS.labels("applied").inc()
            self.models.maybe_publish(self.learner, self.version, self.counters.step)  # every K
        _record_stats(stats, self.counters)
        if stats.selection and not self._selection_on:
            log.info(
                "FLAVA selection switched on at step %d (AVM accuracy EMA %.2f)",
                self.counters.step,
                self._selection_info().get("avm_accuracy_ema", float("nan")),
            )
        self._selection_on = stats.selection
        return stats

    def _publish(
        self, clips: list[tuple[Delivery, Clip]], report: BatchReport, before: Stamp
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed every clip, publish each embedding with its model stamp; the acks wait for
        the checkpoint that holds this update.

        Returns the embeddings (a (B, D), v (B, D)) for the monitors."""
        emb_a, emb_v, stamp = self._embed(clips, before)
        deliveries = [d for d, _ in clips]
        items, non_finite = embeddings_for(deliveries, emb_a, emb_v, stamp, self.settings.method)
        for d in non_finite:
            self._dead(d, "non-finite embedding (NaN/inf in the decoded clip or the model)", report)
        if items:
            self._retry(self.queue.publish_many, items)  # one round trip for the batch
        for d, _ in items:
            state = final_state(d)
            self.checkpoints.record(d, state, trained=state == "learned")
            self._count(state, report)
        return emb_a, emb_v

    def _embed(
        self, clips: list[tuple[Delivery, Clip]], before: Stamp
    ) -> tuple[torch.Tensor, torch.Tensor, Stamp]:
        """-> (emb_a, emb_v, the stamp of the weights that made them).

        FLAVA's step already ran every current clip through the first layers over all
        tokens without gradients; finishing that pass gives the embeddings for ~1/6 of a
        fresh pass, made by (and stamped with) the pre-update model. Batches with probe
        clips, other methods, or ``embed_with=updated`` embed with the updated model."""
        pre = self.learner.take_step_embeddings()
        all_train = all(d.entry.purpose == "train" for d, _ in clips)
        if self.settings.embed_with == "pre_update" and pre is not None and all_train:
            return pre.emb_a, pre.emb_v, before
        emb_a, emb_v = self.learner.embed(_batch([c for _, c in clips]))
        return emb_a, emb_v, Stamp(self.version, self.counters.step)

    def _count(self, state: str, report: BatchReport) -> None:
        if state == "learned":
            report.learned += 1
            self.counters.clips_learned += 1
        else:
            report.probed += 1
            self.counters.clips_probed += 1

    def _dead(self, d: Delivery, reason: str, report: BatchReport) -> None:
        self._retry(self.queue.dead_letter, d, reason)
        report.dead += 1
        report.reasons.append(reason)
        telemetry.CLIPS.labels("dead").inc()

    # ---- housekeeping ----------------------------------------------------------------
    def heartbeat(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_heartbeat < self.settings.heartbeat_s:
            return
        self.lease.take()
        self.queue.heartbeat(self.model_info(now))
        backlog, pending, dead = self.queue.depths()
        telemetry.BACKLOG.set(backlog)
        telemetry.PENDING.set(pending)
        telemetry.DEAD_LETTERS.set(dead)
        telemetry.HEARTBEAT.set(now)
        self._last_heartbeat = now

    def model_info(self, now: float) -> dict[str, str | int | float]:
        c = self.counters
        return {
            "version": c.version,
            "generation": c.generation,
            "step": c.step,
            "method": self.settings.method,
            "preset": self.settings.preset,
            "clips_learned": c.clips_learned,
            "updated_at": now,
            "unacked": self.checkpoints.waiting,
            "checkpoint_error": self.checkpoints.error,
            **self._selection_info(),
            "paused": int(self.control.paused),
            # the durable snapshots POST /model/rollback can go back to, oldest first
            "checkpoints": ",".join(
                f"{g}.{n}"
                for g, n in map(version_of, list_checkpoints(self.settings.checkpoint_dir))
            ),
        }

    def _selection_info(self) -> dict[str, int | float]:
        """The selection gate (FLAVA): AVM accuracy (EMA), the update that switched it on."""
        state = self.learner.selection_state()
        if state is None:
            return {}
        switched = state.selection_step
        return {
            "avm_accuracy_ema": round(state.avm_accuracy_ema, 4),
            "selection_step": -1 if switched is None else switched,
        }

    def _snapshot(self) -> tuple[str, dict]:
        """-> (version, state) for the next checkpoint (tensors still live: the
        checkpointer copies them before training goes on)."""
        return self.version, {
            "format": FORMAT,
            "learner": self.learner.state_dict(),
            "counters": vars(self.counters).copy(),
            "method": self.settings.method,
            "preset": self.settings.preset,
            "monitor": self.monitor.state_dict(),  # probe sets and forgetting history
        }

    def restore(self) -> bool:
        """Resume from the newest readable checkpoint; else warm-start from ``init_weights``."""
        directory = self.settings.checkpoint_dir
        newest = load_newest(directory, _fell_back, self.checkpoints.read_segments)
        if newest is None:
            self._cold_start()
            return False
        self._resume(*newest)
        return True

    def _cold_start(self) -> None:
        """No checkpoint: the weights ``init_weights`` names (builtin, a path, none)."""
        init = resolve_init_weights(self.settings.init_weights, self.settings.preset)
        if init is not None:
            warm_start(self.learner, init)

    def _resume(self, path: Path, state: dict, segments: list[dict] | None) -> None:
        """Learner, counters, ledger head and monitor from a loaded checkpoint."""
        if (state["method"], state["preset"]) != (self.settings.method, self.settings.preset):
            raise ValueError(
                f"checkpoint {path} is {state['method']}/{state['preset']}, settings ask for "
                f"{self.settings.method}/{self.settings.preset}: use another FLAVA_CHECKPOINT_DIR"
            )
        self.checkpoints.load_learner(self.learner, state["learner"], segments)
        self.counters = Counters.restored(state["counters"])
        if "ledger" in state:  # format 2: the ledger chain continues from this checkpoint
            self.checkpoints.head = state["ledger"]["hash"]
            self.durable_settles = {cid: s for cid, s in state["settles"]}
        self._restore_monitor(state, path)
        log.info("resumed from %s at %d updates", path, self.counters.updates)

    def _restore_monitor(self, state: dict, path: Path) -> None:
        """The monitor's probes and history; a checkpoint without them starts it empty."""
        if "monitor" not in state:
            log.info("checkpoint %s has no monitor state: drift and forgetting start empty", path)
            return
        try:
            self.monitor.load_state_dict(state["monitor"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            log.warning("monitor state of %s not restored (%r): it starts empty", path, exc)
            self.monitor = self._new_monitor()
            return
        windows = self.monitor.windows
        log.info(
            "monitor restored: %d windows, %d probes",
            len(windows),
            sum(len(w.probes) for w in windows.values()),
        )

    def _new_checkpointer(self) -> Checkpointer:
        """A Checkpointer for the current learner. It calls back into ``_retry`` weakly:
        a bound method held by a part of the Worker would make a reference cycle."""
        s = self.settings
        policy = CheckpointPolicy.from_settings(s)
        retry = weakly(self._retry)
        memory = self.learner.replay_memory()
        return Checkpointer(s.checkpoint_dir, s.keep_checkpoints, policy, self.queue, retry, memory)

    def _retry(self, fn: Callable, *args, stop: threading.Event | None = None, **kwargs):
        """Call ``fn``; on a Redis outage or transient reply back off (0.1 s doubling to 5 s)
        and try again. ``NOGROUP`` (Redis lost its data): recreate the group, then retry."""
        delay = 0.1
        while True:
            try:
                return fn(*args, **kwargs)
            except RedisError as exc:
                if lost_group(exc):
                    self._queue_reset()
                elif not transient(exc):
                    raise
                telemetry.REDIS_ERRORS.inc()
                log.warning("redis unavailable (%s); retrying in %.1f s", exc, delay)
                if stop is not None and stop.is_set():
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _queue_reset(self) -> None:
        telemetry.QUEUE_RESETS.inc()
        self._ahead = None
        self.checkpoints.forget_tail()
        self.queue.recover_group()

    # ---- operator control: pause, resume, rollback ({p}:control) ------------------------
    def _obey_control(self) -> bool:
        """Read ``{p}:control``; act on a rollback once no batch is in hand. True while
        paused: the loop then only checkpoints what it holds (acks), heartbeats and waits."""
        control = self.queue.read_control()
        if control.paused != self.control.paused:
            log.warning("learning %s by the operator", "paused" if control.paused else "resumed")
        self.control = control
        if self._ahead is not None:  # taken from the stream: learned before anything else
            return False
        if control.rollback_id:
            self._answer_rollback(control.rollback_id, control.rollback_version)
        if not self.control.paused:
            return False
        self.checkpoints.tick(self._snapshot, idle=True)
        self._remove_finished_uploads()
        self.heartbeat()
        if self._stop is not None:
            self._stop.wait(self.settings.block_ms / 1000)
        else:
            time.sleep(self.settings.block_ms / 1000)
        return True

    def _answer_rollback(self, request_id: str, version: str) -> None:
        before = self.version
        try:
            outcome = {"state": "done", "new_version": self.rollback(version)}
        except RollbackRefused as exc:
            log.error(
                "rollback to %s refused: %s",
                version,
                exc,
                extra=self._log_fields(target=version, reason=str(exc)),
            )
            outcome = {"state": "failed", "reason": str(exc)}
        result = {"id": request_id, "version": version, "from_version": before, **outcome}
        self.queue.finish_rollback(request_id, json.dumps({**result, "finished_at": time.time()}))
        self.heartbeat(force=True)

    def rollback(self, version: str) -> str:
        """Go back to the durable checkpoint of ``version`` and go on from it under a new
        generation (docs/versions.md: no version name is reused); returns the new version.

        Everything published so far is checkpointed and acked first (those clips stay
        ``learned``, their embeddings stay those of the versions that made them); the
        updates after ``version`` leave the weights. Refused, with nothing changed, when the
        checkpoint is not there or the current tail cannot be made durable."""
        target = wire.ModelVersion.parse(version)
        path = Path(self.settings.checkpoint_dir) / checkpoint_name(
            target.generation, target.updates
        )
        if not path.exists():
            kept = [f"{g}.{n}" for g, n in map(version_of, list_checkpoints(path.parent))]
            raise RollbackRefused(f"no durable checkpoint of version {version} (kept: {kept})")
        try:  # read before settling: the checkpoint written now may prune this one
            state = load_checkpoint(path)
            segments = self.checkpoints.read_segments(state)
            if (state["method"], state["preset"]) != (self.settings.method, self.settings.preset):
                raise RollbackRefused(f"{path.name} is {state['method']}/{state['preset']}")
        except RollbackRefused:
            raise
        except Exception as exc:  # damaged, a missing memory segment
            raise RollbackRefused(f"checkpoint {path.name} does not load: {exc!r}") from exc
        if not self.settle():
            raise RollbackRefused(
                f"the clips published since the last checkpoint cannot be made durable "
                f"({self.checkpoints.error}): nothing changed"
            )
        self.checkpoints = self._new_checkpointer()
        self.learner.take_step_embeddings()
        self.checkpoints.load_learner(self.learner, state["learner"], segments)
        self.counters = Counters.restored(state["counters"])
        self.checkpoints.head = state["ledger"]["hash"] if "ledger" in state else GENESIS
        self.durable_settles = {}  # every clip published so far was just acked
        self.monitor = self._new_monitor()
        self._restore_monitor(state, path)
        published = self._retry(self.queue.published_generation)
        self.counters.generation = self._claim_generation(published)
        self.checkpoints.updated()  # the rolled-back weights become the newest checkpoint
        self.checkpoints.flush(self._snapshot)
        self.models.maybe_publish(self.learner, self.version, self.counters.step)
        telemetry.MODEL_VERSION.set(self.counters.updates)
        telemetry.GENERATION.set(self.counters.generation)
        log.warning(
            "rolled back to %s: now version %s",
            version,
            self.version,
            extra=self._log_fields(target=version, generation=self.counters.generation),
        )
        return self.version

    def _log_fields(self, **more: object) -> dict[str, object]:
        """The model's ``version`` and ``step`` as log fields (contract/logs.py), and more."""
        return {"version": self.version, "step": self.counters.step, **more}


class RollbackRefused(Exception):
    """A rollback the worker did not do (nothing changed); its message says why."""


def _fell_back(path: Path, exc: Exception) -> None:
    telemetry.CHECKPOINT_FALLBACKS.inc()
    log.error("checkpoint %s is unreadable (%r): falling back to the one before it", path, exc)


def _batch(clips: list[Clip]) -> Batch:
    return Batch(
        fbank=torch.stack([c.fbank for c in clips]),
        frames=torch.stack([c.frames for c in clips]),
    )


def _record_stats(stats: StepStats, counters: Counters) -> None:
    values = stats.as_dict()
    telemetry.STEP_SECONDS.observe(values.get("step_seconds", 0.0))
    for term in ("loss", "loss_rec_a", "loss_rec_v", "loss_nce", "loss_avm", "loss_der"):
        if term in values:
            telemetry.LOSS.labels(term.removeprefix("loss_") if term != "loss" else "total").set(
                values[term]
            )
    telemetry.TOKENS_KEPT.labels("audio").set(values.get("tokens_kept_a", 0))
    telemetry.TOKENS_KEPT.labels("video").set(values.get("tokens_kept_v", 0))
    telemetry.FRACTION_EXCLUDED.set(values.get("frac_excluded", 0.0))
    telemetry.AVM_ACCURACY.set(values.get("avm_acc", 0.0))
    telemetry.SELECTION_ACTIVE.set(1 if values.get("selection") else 0)
    telemetry.MEMORY_FILL.set(values.get("memory_fill", 0))
    telemetry.MEMORY_BYTES.set(values.get("memory_bytes", 0))
    telemetry.MODEL_VERSION.set(counters.updates)
    telemetry.GENERATION.set(counters.generation)


def weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (bound) called through a weak reference to its object. Handing a bound
    method to a part the Worker owns would close a reference cycle, which only the cyclic
    collector frees; it runs on object counts, not bytes, so a dropped Worker (its learner,
    replay memory and buffers) would linger: the tests' Workers held 11 GB that way."""
    ref, name = weakref.WeakMethod(method), method.__qualname__  # no strong reference kept

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        if bound is None:
            raise ReferenceError(f"{name}: its object is gone")
        return bound(*args, **kwargs)

    return call
