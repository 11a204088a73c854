"""A rank group: one learner over N processes, launched by torchrun (docs/distributed.md).

``torchrun --nproc-per-node N -m worker.main`` (or ``flava worker --nproc N``) starts N
ranks. Each is a worker with its own consumer name (``<consumer>-<rank>``: host + rank), its
own share of the stream (the consumer group hands each reader different entries), its own
decode processes, replay memory, random draws and checkpoint directory (rank 0: the
configured one; rank r: ``<dir>/rank-r``). Gradients are averaged over the ranks at every
step (worker/core/distributed.py), so the weights stay one model.

Lockstep: every iteration of every rank meets the others in one small all-gather, the
**vote** (``Vote``), after its clips are decoded and before any step. Whether a step is
taken, whether to stop, to checkpoint or to pause is decided there, the same on every rank:

- a step is taken when any rank has training clips; a rank with none takes part without
  a gradient (``Learner.sit_out``), so every rank takes the same number of steps and no
  all-reduce waits for a rank that skipped it;
- a checkpoint is taken when any rank's policy asks, by every rank at the same version;
- a rank acks its clips only once every rank has a durable checkpoint of their update
  (the vote carries each rank's newest durable version; the minimum is released), so a
  restart, which restores the newest version every rank holds, never loses an acked clip;
- a stop (SIGTERM on any rank) ends the loop on every rank after the same step, then each
  writes its last checkpoint and one more vote releases the acks;
- when any rank has probe clips, every rank sends its probes to rank 0's monitors.

A collective entered by one rank must be entered by all: after the vote nothing may end an
iteration early (a failed read-ahead is logged, not raised).

Rank 0 is the group's face: it holds the single-learner lease (worker/lease.py) for the
whole group, publishes the model version, heartbeat, models and monitor summary; a rollback
request is refused (a group restores only the newest common checkpoint). A rank that dies
fails the next collective of the others; torchrun then restarts the group
(``--max-restarts``) from the last checkpoint, and each rank re-reads its own pending
entries under the same consumer name.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
import torch
import torch.distributed as dist
from redis.exceptions import RedisError
from torch import Tensor

from worker.checkpoint import checkpoint_name, load_checkpoint, load_newest, version_of
from worker.checkpointing import version_key
from worker.core.distributed import (
    SHARED_STATE,
    AllReduceGradients,
    broadcast_learner,
    rank_seed,
)
from worker.core.learner import Learner, StepStats
from worker.core.media import Clip
from worker.monitoring import MonitorConfig, StreamMonitor
from worker.publishing import Stamp
from worker.queue import Delivery
from worker.runner import BatchReport, Fetched, Worker, _fell_back
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# a collective that waits longer than this (a rank stuck, not dead: a dead one fails it at
# once) raises, and torchrun restarts the group
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
NOTHING_HELD = 1 << 62  # a rank with no checkpoint, when the ranks take the lowest version


@dataclass(frozen=True)
class Vote:
    """One rank's say in an iteration; the group's answer has the same fields."""

    step: bool = False  # this rank has training clips (group: any rank has)
    stop: bool = False  # asked to stop (group: any rank was)
    checkpoint: bool = False  # its policy asks for a checkpoint (group: any rank's does)
    paused: bool = False  # the operator paused learning (rank 0 reads it)
    probes: bool = False  # it has probe clips (group: any has: rank 0 gathers them)
    durable: int = -1  # version_key of its newest durable checkpoint, -1 none (group: min)
    learned: int = 0  # clips it learned, for rank 0's heartbeat (group: sum)
    unacked: int = 0  # clips it published and has not acked yet (group: sum)

    def as_row(self) -> list[int]:
        flags = [self.step, self.stop, self.checkpoint, self.paused, self.probes]
        return [*flags, self.durable, self.learned, self.unacked]

    @classmethod
    def of_group(cls, rows: list[list[int]]) -> Vote:
        """Every rank's row -> the group's answer (each rank computes the same)."""
        step, stop, checkpoint, paused, probes, durable, learned, unacked = zip(*rows, strict=True)
        flags = (any(step), any(stop), any(checkpoint), any(paused), any(probes))
        return cls(*flags, min(durable), sum(learned), sum(unacked))


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the group torchrun started: RANK, WORLD_SIZE, LOCAL_RANK."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environment(cls) -> RankGroup | None:
        """The group of a process torchrun started; None for a plain worker."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        env = os.environ
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def settings_for(self, settings: WorkerSettings) -> WorkerSettings:
        """This rank's settings: its consumer name, checkpoint directory, device and seed;
        only rank 0 serves metrics, publishes models and evaluates the monitors."""
        ckpt = settings.checkpoint_dir
        mine: dict[str, Any] = {
            "consumer": f"{settings.consumer}-{self.rank}",
            "checkpoint_dir": ckpt if self.leader else os.path.join(ckpt, f"rank-{self.rank}"),
            "device": self.device(settings.device),
            "seed": rank_seed(settings.seed, self.rank),
        }
        if not self.leader:
            mine |= {"metrics_port": 0, "publish_every": 0, "monitor_every": 0}
        return settings.model_copy(update=mine)

    def device(self, wanted: str) -> str:
        """One GPU per rank (``cuda:<local rank>``) when GPUs are wanted and present."""
        if wanted in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return "cpu" if wanted == "auto" else wanted

    def join(self, device: str) -> None:
        """Join the process group: NCCL between GPUs, gloo between CPU processes."""
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        store = self._store()
        dist.init_process_group(
            backend,
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        log.info("rank %d of %d joined (%s)", self.rank, self.world_size, backend)

    def _store(self) -> dist.Store:
        """torchrun's store, under a prefix per restart of the group: the addresses the
        ranks of a killed attempt left there would otherwise be read by the next attempt's
        ranks (gloo then fails to connect, and every restart with it)."""
        store, _, _ = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"flava-attempt-{attempt}", store)

    def vote(self, mine: Vote) -> Vote:
        """The group's answer: one all-gather of every rank's 8 integers."""
        row = torch.tensor([int(v) for v in mine.as_row()], dtype=torch.int64)
        row = row.to(_collective_device())
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        return Vote.of_group([[int(v) for v in r.tolist()] for r in rows])

    def highest(self, value: int) -> int:
        return self._max([value])[0]

    def lowest(self, value: int) -> int:
        return -self._max([-value])[0]

    def _max(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64, device=_collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [int(v) for v in tensor.tolist()]

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _collective_device() -> str:
    """NCCL reduces tensors on the rank's GPU (set by ``join``); gloo on the CPU."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


class ProbeRelay:
    """Probe clips of the ranks other than 0, for rank 0's monitors: the forgetting figures
    need every probe, and each rank reads only its share of the stream."""

    def __init__(self, group: RankGroup) -> None:
        self.group = group
        self.held: list[tuple] = []  # (entry, clip, emb_a (D,), emb_v (D,)) of this batch

    def keep(self, clips: list[tuple[Delivery, Clip]], emb_a: Tensor, emb_v: Tensor) -> None:
        rows = [i for i, (d, _) in enumerate(clips) if d.entry.purpose == "probe"]
        self.held = [(clips[i][0].entry, clips[i][1], emb_a[i].cpu(), emb_v[i].cpu()) for i in rows]

    def gather(self, monitor: StreamMonitor) -> bool:
        """One gather to rank 0 (every rank calls it); rank 0's monitor keeps what came.
        True on rank 0 when probes came."""
        mine, self.held = self.held, []
        parts: list[Any] = [None] * self.group.world_size if self.group.leader else []
        dist.gather_object(mine, parts if self.group.leader else None, dst=0)
        probes = [p for part in parts for p in (part or [])]
        if not probes:
            return False
        entries, clips, emb_a, emb_v = zip(*probes, strict=True)
        monitor.observe(list(entries), list(clips), torch.stack(emb_a), torch.stack(emb_v))
        return True


class FollowerLease:
    """A rank other than 0 holds no lease: rank 0's covers the group."""

    def take(self) -> None:
        return None

    def release(self) -> None:
        return None


class RankWorker(Worker):
    """A Worker that is one rank of a group: the loop above, voted on every iteration."""

    def __init__(
        self,
        settings: WorkerSettings,
        client: redis.Redis,
        group: RankGroup,
        learner: Learner | None = None,
    ):
        self.group = group
        super().__init__(settings, client, learner)
        self.learner.gradients = AllReduceGradients()
        self.checkpoints.hold_acks = True
        self.agreed = Vote()  # the group's answer to the last vote
        self.probes = ProbeRelay(group)
        if not group.leader:
            self.lease = FollowerLease()  # type: ignore[assignment]

    def _new_monitor(self) -> StreamMonitor:
        """Rank 0's monitor publishes; the others' only feed nothing to Redis."""
        client = self.queue.redis if self.group.leader else None
        cfg = MonitorConfig.from_settings(self.settings)
        return StreamMonitor(cfg, self.learner, client, self.queue.keys)

    # ---- the loop ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Iterate until the group agrees to stop (or reaches ``max_steps``), then write
        the last checkpoint and release the acks every rank's checkpoint covers."""
        self.start()
        self._stop = stop
        finished = False
        try:
            while not self.agreed.stop and not self._reached_max_steps():
                self._retry(self.iterate, stop=stop)
            self.checkpoints.start_now(self._snapshot)
            self.checkpoints.wait()
            self._release(self.group.vote(Vote(durable=self.checkpoints.durable)))
            finished = True
        finally:  # after a failed collective (a rank died) nothing more is acked
            self._remove_finished_uploads()
            self.pool.shutdown()
            self._retry(self.lease.release, stop=stop)
            log.info("rank %d stopped at version %s", self.group.rank, self.version)
            if finished:
                self.group.leave()

    def _iteration(self) -> BatchReport | None:
        """Fetch (unless paused), vote and step inside ``process``, then housekeeping."""
        if self.group.leader:
            self._read_control()
        paused = self.agreed.paused
        fetched, self._ahead = self._ahead or self._fetch_unless(paused), None
        report = self.process(fetched)
        if self.agreed.probes:
            self._gather_probes()
        if report.stats is None:
            self.monitor.catch_up(self.counters.step, self.version)
        self._remove_finished_uploads()
        if report.stats is None and self.inputs is not None:
            self.inputs.maybe_sweep()
        if self.agreed.paused and self._stop is not None:
            self._stop.wait(self.settings.block_ms / 1000)
        self.heartbeat()
        return report

    def _fetch_unless(self, paused: bool) -> Fetched:
        return Fetched([], []) if paused else self._fetch(self.settings.block_ms)

    def _read_ahead(self) -> None:
        """Deferred to after the vote (``_learn``): not when the group is stopping."""

    def _read_ahead_now(self) -> None:
        """The next batch, read while this step runs. A Redis error here must not end the
        iteration: the other ranks are already in this step's all-reduce."""
        try:
            super()._read_ahead()
        except RedisError as exc:
            log.warning("reading ahead failed (%s): the batch is read next iteration", exc)
            self._ahead = None
            self.queue.reread_pending()  # what that read delivered comes first

    def _learn(self, clips: list[tuple[Delivery, Clip]]) -> StepStats | None:
        """Vote, checkpoint if agreed, then step with this rank's clips or sit out."""
        train = [c for d, c in clips if d.entry.purpose == "train"]
        probes = any(d.entry.purpose == "probe" for d, _ in clips)
        self.agreed = self.group.vote(self._my_vote(bool(train), probes))
        if self.agreed.checkpoint:
            self.checkpoints.start_now(self._snapshot)  # every rank at the same version
        self._release(self.agreed)
        if not self.agreed.stop and not self.agreed.paused:
            self._read_ahead_now()  # decodes while the step runs
        if not self.agreed.step:
            return None
        if train:
            return super()._learn(clips)
        return self._applied(self.learner.sit_out())

    def _my_vote(self, has_clips: bool, has_probes: bool) -> Vote:
        self.checkpoints.collect()
        stop = self._stop is not None and self._stop.is_set()
        due = self.checkpoints.due(idle=not has_clips)
        paused = self.control.paused if self.group.leader else False
        counts = (self.counters.clips_learned, self.checkpoints.waiting)
        return Vote(has_clips, stop, due, paused, has_probes, self.checkpoints.durable, *counts)

    def _publish(
        self, clips: list[tuple[Delivery, Clip]], report: BatchReport, before: Stamp
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As a worker publishes; a rank other than 0 keeps its probes for rank 0."""
        emb_a, emb_v = super()._publish(clips, report, before)
        if not self.group.leader:
            self.probes.keep(clips, emb_a, emb_v)
        return emb_a, emb_v

    def _gather_probes(self) -> None:
        if self.probes.gather(self.monitor):
            self.monitor.publish(self.counters.step, self.version)

    def _release(self, agreed: Vote) -> None:
        self.checkpoints.release(agreed.durable)

    def _read_control(self) -> None:
        """Rank 0 reads the operator's asks: a pause goes to the vote, a rollback is
        answered as refused (a group restores only the newest common checkpoint)."""
        self.control = self._retry(self.queue.read_control)
        request = self.control.rollback_id
        if not request:
            return
        result = {
            "id": request,
            "version": self.control.rollback_version,
            "from_version": self.version,
            "state": "failed",
            "reason": "a rank group does not roll back: stop it and restart from a checkpoint",
            "finished_at": time.time(),
        }
        self._retry(self.queue.finish_rollback, request, json.dumps(result))

    def model_info(self, now: float) -> dict[str, str | int | float]:
        """Rank 0's, with the group's clip counts (as of the last vote)."""
        return {
            **super().model_info(now),
            "clips_learned": self.agreed.learned,
            "unacked": self.agreed.unacked,
        }

    def heartbeat(self, force: bool = False) -> None:
        """Rank 0 announces the model; the others only that their consumer is alive."""
        if self.group.leader:
            super().heartbeat(force)
            return
        now = time.time()
        if force or now - self._last_heartbeat >= self.settings.heartbeat_s:
            self.queue.heartbeat({})
            self._last_heartbeat = now

    # ---- start: one version, one generation, equal weights ---------------------------
    def restore(self) -> bool:
        """Resume every rank from the newest version all ranks hold a checkpoint of, then
        take one resumed rank's weights, optimizer and counters (equal already after a
        resume; a rank added since has no checkpoint and starts with an empty memory)."""
        directory = self.settings.checkpoint_dir
        newest = load_newest(directory, _fell_back, self.checkpoints.read_segments)
        mine = version_key(_version_name(newest[0])) if newest else NOTHING_HELD
        target = self.group.lowest(mine)  # the newest version every rank that has any holds
        if newest is not None and mine != target:
            newest = self._load_version(target)
        weights = newest is not None and "model" in newest[1]["learner"]  # rank 0's holds them
        if newest is not None:
            path, state, segments = newest
            state["learner"] = {**self.learner.state_dict(), **state["learner"]}  # rank r > 0:
            self._resume(path, state, segments)  # its own parts; the shared ones come next
            self.checkpoints.durable = target
        else:
            self._cold_start()
        self._take_shared_state(newest is not None, weights)
        return newest is not None

    def _snapshot(self) -> tuple[str, dict]:
        """Ranks other than 0 leave the weights and optimizer out of their checkpoints:
        every rank holds rank 0's (a restart broadcasts them), and at `base` they are
        ~2.3 GB a rank would write again at every checkpoint."""
        version, state = super()._snapshot()
        if not self.group.leader:
            state["learner"] = {k: v for k, v in state["learner"].items() if k not in SHARED_STATE}
        return version, state

    def _load_version(self, key: int) -> tuple[Any, dict, list[dict] | None]:
        """This rank's checkpoint of the group's common version (it has newer ones)."""
        generation, updates = divmod(key, 10**10)
        path = self.checkpoints.writer.directory / checkpoint_name(generation, updates)
        if not path.exists():
            raise RuntimeError(
                f"rank {self.group.rank} has no checkpoint {path.name}, the newest version "
                "every rank holds: the ranks' checkpoint directories are not one group's "
                "(FLAVA_CHECKPOINT_DIR and its rank-r folders must be used together)"
            )
        state = load_checkpoint(path)
        return path, state, self.checkpoints.read_segments(state)

    def _take_shared_state(self, resumed: bool, weights: bool) -> None:
        """Weights, optimizer and counters from the rank that resumed the checkpoint holding
        them (rank 0's directory), or rank 0's start when no rank has a checkpoint."""
        src = self.group.lowest(self.group.rank if weights else NOTHING_HELD)
        if src == NOTHING_HELD and self.group.highest(int(resumed)):
            raise RuntimeError(
                "ranks resumed checkpoints but none holds the weights (they are in rank 0's "
                "FLAVA_CHECKPOINT_DIR): across machines give every node the same checkpoint "
                "volume, or fixed node ranks (docs/distributed.md)"
            )
        src = 0 if src == NOTHING_HELD else src
        broadcast_learner(self.learner, src=src)
        shared: list[Any] = [(self.counters.updates, self.counters.step)]
        dist.broadcast_object_list(shared, src=src)
        self.counters.updates, self.counters.step = shared[0]

    def _claim_generation(self, published: int) -> int:
        """Every rank claims in its own directory; the group takes the largest claim, so
        it is newer than any generation any rank (or Redis) has seen."""
        return self.group.highest(super()._claim_generation(published))


def _version_name(path: Any) -> str:
    generation, updates = version_of(path)
    return f"{generation}.{updates}"
