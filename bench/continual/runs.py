"""The jobs, each run in its own worker process: pretraining one seed, one continual run
(a method on a sequence with a seed), and the one-at-a-time efficiency measurement."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.continual.config import MULTITASK, EfficiencyConfig, TrainConfig
from bench.continual.metrics import summarize
from bench.continual.probes import avm_diagnostics, evaluate
from bench.continual.sequences import SequenceData, load_sequence
from bench.perfkit import reset_peak_rss, status_kb
from worker.core.clipset import ClipSet, batch_order, concat_sets, to_batch
from worker.core.files import atomic_torch_save
from worker.core.learner import Learner, LearnerConfig, build_learner
from worker.core.model import preset
from worker.core.pretrain import PretrainConfig, Pretrained, pretrain
from worker.warmstart import warm_start

logger = logging.getLogger(__name__)


def learner_config(train: TrainConfig, seed: int) -> LearnerConfig:
    return LearnerConfig(
        lr=train.lr,
        seed=seed,
        memory_size=train.memory_size,
        # the benchmark needs no embeddings from inside a step (the worker publishes them)
        options={"warmup_acc": train.warmup_acc, "pre_update_embeddings": False},
    )


def start_learner(method: str, train: TrainConfig, seed: int, ckpt: dict[str, Any]) -> Learner:
    """``method``'s learner from the pretrained backbone (and AVM, if it has one)."""
    learner = build_learner(method, preset(train.preset), learner_config(train, seed))
    learner.model.load_state_dict(ckpt["model"])
    if "avm" in learner.extra_modules:
        learner.extra_modules["avm"].load_state_dict(ckpt["avm"])
    return learner


def train_steps(learner: Learner, clips: ClipSet, order: Tensor) -> list[dict]:
    """One ``learner.step`` per row of ``order``; the StepStats as dicts."""
    return [learner.step(to_batch(clips, idx)).as_dict() for idx in order]


def _rng(seed: int, task: int) -> np.random.Generator:
    return np.random.default_rng([seed, task, 31])


# ---------------------------------------------------------------------------------------------
# pretraining one seed
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainJob:
    sequence: str
    seed: int
    data_path: str
    checkpoint_path: str
    cfg: PretrainConfig
    train: TrainConfig  # evaluation chunk and threads
    start: str | None = None  # a flava pretrain file to start from instead of pretraining


def load_start(path: Path, train: TrainConfig) -> Pretrained:
    """A `flava pretrain` weights file, loaded as the worker loads it (``warm_start``), as a
    pretraining result; its log has no curves and no pretraining time."""
    learner = build_learner("flava", preset(train.preset), LearnerConfig(memory_size=1))
    warm_start(learner, path)
    avm = learner.extra_modules["avm"].state_dict()
    log = {"seconds": 0.0, "backbone_loss": [], "avm_train_acc": [], "start_file": str(path)}
    return Pretrained(learner.model.state_dict(), avm, log)


def pretrain_job(job: PretrainJob) -> dict[str, Any]:
    """Pretrain on the sequence's separate distribution, measure the start on every task's
    held-out set, cache the checkpoint; returns its log. Resumes an interrupted pretraining."""
    torch.set_num_threads(job.train.threads)
    seq = load_sequence(Path(job.data_path))
    ckpt_path = Path(job.checkpoint_path)
    partial = ckpt_path.with_name(ckpt_path.name + ".partial")
    if job.start is None:
        result = pretrain(*seq.pretrain, job.cfg, resume=partial)
    else:
        result = load_start(Path(job.start), job.train)
    ckpt = {"model": result.model, "avm": result.avm}
    start = time.perf_counter()
    learner = start_learner("flava", job.train, job.seed, ckpt)
    held = [t[1] for t in seq.tasks]
    log = {
        **result.log,
        "start_retrieval": evaluate(learner, held, job.train.eval_chunk),
        "start_avm": [avm_diagnostics(learner, h, job.seed) for h in held],
        "heldout_avm": avm_diagnostics(learner, seq.pretrain[1], job.seed),
    }
    log["eval_seconds"] = time.perf_counter() - start
    atomic_torch_save({**ckpt, "log": log}, ckpt_path)
    partial.unlink(missing_ok=True)
    logger.info("%s seed %d: pretrained in %.0f s", job.sequence, job.seed, log["seconds"])
    return log


# ---------------------------------------------------------------------------------------------
# one continual run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    sequence: str
    method: str  # a registered learner, or "multitask"
    seed: int
    data_path: str
    checkpoint_path: str  # this seed's pretraining
    train: TrainConfig
    probe: bool = True  # AVM diagnostics after each task (methods with an AVM)

    @property
    def name(self) -> str:
        return f"{self.sequence}-{self.method}-s{self.seed}"


def task_stats(stats: list[dict], learner: Learner) -> dict[str, Any]:
    """What the steps of one task did, averaged; where FLAVA's selection gate stands."""
    state = learner.selection_state()
    return {
        **{k: float(np.mean([s[k] for s in stats])) for k in _STAT_KEYS},
        "steps": len(stats),
        "memory_fill": stats[-1]["memory_fill"],
        "memory_bytes": stats[-1]["memory_bytes"],
        "selection_step": None if state is None else state.selection_step,
        "skipped": sum(bool(s["skipped"]) for s in stats),
    }


_STAT_KEYS = (
    "loss",
    "loss_rec_a",
    "loss_rec_v",
    "loss_nce",
    "loss_avm",
    "loss_der",
    "avm_acc",
    "frac_excluded",
    "selection",
    "tokens_kept_a",
    "tokens_kept_v",
    "replay_size",
)


def run_job(job: Job) -> dict[str, Any]:
    """One method on one sequence with one seed (call in a worker process)."""
    torch.set_num_threads(job.train.threads)
    seq = load_sequence(Path(job.data_path))
    ckpt = torch.load(job.checkpoint_path, weights_only=True)
    method = "finetune" if job.method == MULTITASK else job.method
    learner = start_learner(method, job.train, job.seed, ckpt)
    held = [t[1] for t in seq.tasks]
    plan = multitask_plan(seq, job) if job.method == MULTITASK else sequential_plan(seq, job)
    probe = job.probe and "avm" in learner.extra_modules
    base_kb, peak_kb, clips_seen = status_kb("VmRSS"), 0, 0
    secs = {"train": 0.0, "eval": 0.0, "probe": 0.0}
    rows, per_task, probes = [], [], []
    for clips, order in plan:
        reset_peak_rss()
        stats = _timed(secs, "train", train_steps, learner, clips, order)
        peak_kb, clips_seen = max(peak_kb, status_kb("VmHWM")), clips_seen + order.numel()
        per_task.append(task_stats(stats, learner))
        rows.append(_timed(secs, "eval", evaluate, learner, held, job.train.eval_chunk))
        if probe:
            probes.append(_timed(secs, "probe", _probe_all, learner, held, job.seed))
        logger.info("%s: task %d/%d done", job.name, len(rows), len(plan))
    steps = sum(len(o) for _, o in plan)
    return {
        "job": dataclasses.asdict(job),
        "rows": rows,
        "summary": {view: summarize(rows, view) for view in ("instance", "label")},
        "tasks": per_task,
        "avm_probes": probes,
        "seconds": secs,
        "updates": steps,
        "clips_per_update": int(plan[0][1].shape[1]),  # current clips (replay methods: + as many)
        "efficiency": {
            "train_seconds": secs["train"],
            "clips_per_second": clips_seen / secs["train"] if secs["train"] else math.nan,
            "step_seconds": secs["train"] / steps,
            "base_rss_mb": base_kb / 1024,
            "peak_train_rss_mb": peak_kb / 1024,
            "train_rss_increase_mb": (peak_kb - base_kb) / 1024,
            "replay_memory_mb": per_task[-1]["memory_bytes"] / 2**20,
        },
    }


def _timed(secs: dict[str, float], key: str, fn: Any, *args: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args)
    secs[key] += time.perf_counter() - start
    return out


def _probe_all(learner: Learner, sets: list[ClipSet], seed: int) -> list[dict[str, float]]:
    return [avm_diagnostics(learner, s, seed) for s in sets]


def sequential_plan(seq: SequenceData, job: Job) -> list[tuple[ClipSet, Tensor]]:
    """Each task's training set with its batch order; the order depends on the seed only."""
    t = job.train
    return [
        (clips, batch_order(len(clips), t.steps_per_task, t.batch, _rng(job.seed, k)))
        for k, (clips, _) in enumerate(seq.tasks)
    ]


def multitask_plan(seq: SequenceData, job: Job) -> list[tuple[ClipSet, Tensor]]:
    """All tasks' clips jointly: as many updates as a sequential run, each with as many clips
    as a replay method's (current + replayed), evaluated once at the end."""
    t = job.train
    joint = concat_sets([c for c, _ in seq.tasks])
    steps = t.steps_per_task * len(seq.tasks)
    return [(joint, batch_order(len(joint), steps, t.multitask_batch, _rng(job.seed, 999)))]


# ---------------------------------------------------------------------------------------------
# efficiency, one method at a time
# ---------------------------------------------------------------------------------------------


def efficiency_job(job: Job, cfg: EfficiencyConfig) -> dict[str, Any]:
    """Steady-state step time and memory of one method, alone in its process.

    RSS readings: ``base`` with the data loaded, before the learner exists; ``steady`` after
    the warm-up steps (model, optimizer state, full replay memory); ``peak`` the high-water
    mark during the timed steps. peak - steady is what a step allocates on top (activations,
    gradients, temporaries); peak - base is everything the method costs.
    """
    torch.set_num_threads(job.train.threads)
    clips = load_sequence(Path(job.data_path)).tasks[0][0]
    reset_peak_rss()
    base = status_kb("VmRSS")
    ckpt = torch.load(job.checkpoint_path, weights_only=True)
    learner = start_learner(job.method, job.train, job.seed, ckpt)
    n = cfg.warmup_steps + cfg.timed_steps
    order = batch_order(len(clips), n, job.train.batch, _rng(job.seed, 0))
    train_steps(learner, clips, order[: cfg.warmup_steps])
    reset_peak_rss()
    steady, start = status_kb("VmRSS"), time.perf_counter()
    stats = train_steps(learner, clips, order[cfg.warmup_steps :])
    seconds, peak = time.perf_counter() - start, status_kb("VmHWM")
    return {
        "method": job.method,
        "step_seconds": seconds / cfg.timed_steps,
        "clips_per_second": cfg.timed_steps * job.train.batch / seconds,
        "base_rss_mb": base / 1024,
        "steady_rss_mb": steady / 1024,
        "peak_rss_mb": peak / 1024,
        "step_peak_mb": (peak - steady) / 1024,
        "total_increase_mb": (peak - base) / 1024,
        "replay_memory_mb": stats[-1]["memory_bytes"] / 2**20,
        "tokens_kept_v": stats[-1]["tokens_kept_v"],
        "loadavg": loadavg(),
    }


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []
