"""The benchmark: prepare each sequence (clips, one pretraining per seed), run every job in a
worker process, aggregate over seeds, write the report."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.avdigits import MissingRecordings
from bench.continual.aggregate import aggregate
from bench.continual.config import FLAVA_FAMILY, MULTITASK, BenchConfig
from bench.continual.report import write_report
from bench.continual.runs import Job, PretrainJob, efficiency_job, loadavg, pretrain_job, run_job
from bench.continual.sequences import cached_sequence, config_key
from worker.builtin import sha256_file
from worker.core.learner import LEARNERS
from worker.core.model import preset

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Prepared:
    """A sequence ready to run: its cached clips and one pretrained checkpoint per seed."""

    name: str
    data_path: Path
    checkpoints: dict[int, Path]  # seed -> checkpoint
    task_names: list[str]
    pretrain_logs: dict[int, dict[str, Any]]  # seed -> log
    build_seconds: float  # clip generation (when it was built, maybe by an earlier call)
    built_now: bool  # generated in this invocation (else from the cache)
    pretrained_now: list[int]  # seeds pretrained in this invocation


def _sequence_config(cfg: BenchConfig, name: str) -> Any:
    return {"localized": cfg.localized, "synthetic": cfg.synthetic, "avdigits": cfg.avdigits}[name]


def checkpoint_path(cfg: BenchConfig, data_path: Path, seed: int) -> Path:
    """Cached per (sequence config, pretraining config or start file, seed)."""
    how = cfg.pretrain_config(seed) if cfg.start is None else sha256_file(cfg.start)
    key = config_key(data_path.name, how)
    return cfg.cache_dir / f"pretrain-{data_path.stem}-s{seed}-{key}.pt"


def prepare(cfg: BenchConfig, pool: cf.Executor) -> tuple[list[Prepared], dict[str, str]]:
    """Clips and per-seed pretrained checkpoints of every sequence; {skipped sequence: why}."""
    data, built, skipped = build_sequences(cfg, None if cfg.fresh_processes else pool)
    todo = {
        (name, seed): PretrainJob(
            name,
            seed,
            str(path),
            str(ckpt),
            cfg.pretrain_config(seed),
            cfg.train,
            None if cfg.start is None else str(cfg.start),
        )
        for name, path in data.items()
        for seed in cfg.seeds_for(name)
        if not (ckpt := checkpoint_path(cfg, path, seed)).exists()
    }
    for fut in [pool.submit(pretrain_job, job) for job in todo.values()]:
        fut.result()
    return [_prepared(cfg, n, p, n in built, todo) for n, p in data.items()], skipped


def build_sequences(
    cfg: BenchConfig, pool: cf.Executor | None
) -> tuple[dict[str, Path], set[str], dict[str, str]]:
    """({sequence: cached clips}, sequences built now, {skipped sequence: why}); clips are
    generated in ``pool``, else in a new pool of long-lived processes (one start-up each,
    not one per chunk)."""
    model, data, skipped = preset(cfg.train.preset), {}, {}
    missing = [name for name in cfg.sequences if not _cache_hit(cfg, name)]
    level = logging.getLogger().getEffectiveLevel()
    reuse = dataclasses.replace(cfg, fresh_processes=False)
    own = missing and pool is None
    with make_pool(reuse, level) if own else contextlib.nullcontext(pool) as workers:
        for name in cfg.sequences:
            try:
                seq_cfg = _sequence_config(cfg, name)
                data[name] = cached_sequence(name, seq_cfg, model, cfg.cache_dir, workers)
            except MissingRecordings as err:
                logger.error("%s skipped: %s", name, err)
                skipped[name] = str(err)
    return data, set(missing) & set(data), skipped


def _cache_hit(cfg: BenchConfig, name: str) -> bool:
    key = config_key(name, _sequence_config(cfg, name), preset(cfg.train.preset))
    return (cfg.cache_dir / f"{name}-{key}.pt").exists()


def _prepared(
    cfg: BenchConfig, name: str, path: Path, built: bool, todo: dict[tuple[str, int], Any]
) -> Prepared:
    seeds = cfg.seeds_for(name)
    ckpts = {s: checkpoint_path(cfg, path, s) for s in seeds}
    logs = {s: torch.load(c, weights_only=True)["log"] for s, c in ckpts.items()}
    state = torch.load(path, weights_only=True)
    return Prepared(
        name,
        path,
        ckpts,
        list(state["task_names"]),
        logs,
        float(state["build_seconds"]),
        built,
        [s for s in seeds if (name, s) in todo],
    )


def make_jobs(cfg: BenchConfig, prepared: list[Prepared], methods: list[str]) -> list[Job]:
    """Every (sequence, method, seed) run, the slowest methods first (better packing)."""
    jobs = [
        Job(
            p.name, m, s, str(p.data_path), str(p.checkpoints[s]), cfg.train, m in cfg.probe_methods
        )
        for p in prepared
        for m in methods
        for s in cfg.seeds_for(p.name)
    ]
    return sorted(jobs, key=lambda j: (j.method not in FLAVA_FAMILY, j.method == MULTITASK))


def _job_result_path(cfg: BenchConfig, job: Job) -> Path:
    return cfg.out_dir / "runs" / f"{job.name}.json"


def _reusable(cfg: BenchConfig, job: Job) -> dict[str, Any] | None:
    """A finished run of exactly this job from an earlier invocation (``resume`` only)."""
    path = _job_result_path(cfg, job)
    if not (cfg.resume and path.exists()):
        return None
    result = json.loads(path.read_text())
    return result if result["job"] == json.loads(json.dumps(dataclasses.asdict(job))) else None


def run_jobs(
    cfg: BenchConfig, jobs: list[Job], pool: cf.Executor
) -> tuple[list[dict[str, Any]], int]:
    """Run (or reuse) every job; each result is written to out_dir/runs as it finishes.

    Returns the results and how many of them were reused."""
    reused = {j.name: r for j in jobs if (r := _reusable(cfg, j)) is not None}
    todo = [j for j in jobs if j.name not in reused]
    logger.info("%d runs to do, %d reused", len(todo), len(reused))
    results = list(reused.values())
    futures = {pool.submit(run_job, j): j for j in todo}
    for fut in cf.as_completed(futures):
        job, result = futures[fut], fut.result()
        path = _job_result_path(cfg, job)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        logger.info("%s done: %s", job.name, {k: round(v) for k, v in result["seconds"].items()})
        results.append(result)
    return results, len(reused)


def run_efficiency(
    cfg: BenchConfig, prepared: list[Prepared], methods: list[str], pool: cf.Executor
) -> list[dict[str, Any]]:
    """Every method's ``efficiency_job`` on the first sequence, one at a time."""
    if not prepared or cfg.efficiency is None:
        return []
    p, out = prepared[0], []
    seed = min(p.checkpoints)
    for m in [m for m in methods if m != MULTITASK]:  # multitask steps are finetune steps
        job = Job(p.name, m, seed, str(p.data_path), str(p.checkpoints[seed]), cfg.train, False)
        out.append(pool.submit(efficiency_job, job, cfg.efficiency).result())
        logger.info("efficiency %s: %.2f s/step", m, out[-1]["step_seconds"])
    return out


def available_methods(wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(methods that can run, {missing method: why})."""
    import importlib

    error = ""
    try:
        importlib.import_module("worker.core.methods")
    except Exception as err:  # a broken methods module leaves the built-in learners
        error = f": worker.core.methods failed to import ({err!r})"
    ok, missing = [], {}
    for m in wanted:
        if m == MULTITASK or m in LEARNERS:
            ok.append(m)
        else:
            missing[m] = f"not registered in worker.core.learner.LEARNERS{error}"
    return ok, missing


def make_pool(cfg: BenchConfig, log_level: int) -> cf.ProcessPoolExecutor:
    """Spawned interpreters (no forked torch threads); one per job when ``fresh_processes``
    (clean peak RSS per run), else reused (saves ~3 s of start-up per job)."""
    return cf.ProcessPoolExecutor(
        cfg.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(log_level,),
        max_tasks_per_child=1 if cfg.fresh_processes else None,
    )


def _init_worker(log_level: int) -> None:
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    import worker.core.methods  # noqa: F401  (registers the methods)


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Everything: prepare, run, aggregate, write the report. Returns the aggregate."""
    start, load_start = time.perf_counter(), loadavg()
    methods, missing = available_methods(cfg.methods)
    with make_pool(cfg, logging.getLogger().getEffectiveLevel()) as pool:
        prepared, skipped = prepare(cfg, pool)
        prep_s = time.perf_counter() - start
        results, reused = run_jobs(cfg, make_jobs(cfg, prepared, methods), pool)
        runs_s = time.perf_counter() - start - prep_s
        efficiency = run_efficiency(cfg, prepared, methods, pool)
    report = aggregate(prepared, results)
    report["efficiency"] = efficiency
    report["meta"] = {
        "mode": cfg.mode,
        "missing_methods": missing,
        "skipped_sequences": skipped,
        "wall_seconds": time.perf_counter() - start,
        "prepare_seconds": prep_s,
        "runs_seconds": runs_s,
        "efficiency_seconds": time.perf_counter() - start - prep_s - runs_s,
        "runs_reused": reused,
        "runs_total": len(results),
        "workers": cfg.workers,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "cpus": multiprocessing.cpu_count(),
        "torch": torch.__version__,
        "code": code_version(),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    write_report(report, cfg.out_dir)
    return report


def code_version() -> dict[str, Any]:
    """The commit the run used and any uncommitted changes to the code it runs."""

    def git(*args: str) -> str:
        try:
            run = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return run.stdout.strip()

    dirty = git(
        "status", "--porcelain", "--", "worker/core", "bench/continual", "bench/avdigits.py"
    )
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": dirty.splitlines()}
