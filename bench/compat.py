"""Compatible spaces (issue 15 section 4): how far the online learner moves its embedding
space, with and without a distillation term toward stored embeddings.

The worker's monitor (worker/monitoring.py) measures cross-version retrieval on held-out
probes: R@1 of the probes embedded by the current version (queries) against the same probes
embedded by the version ``lag`` evaluations earlier (gallery), as a ratio to same-version
R@1. This script runs the same measurement (``worker.core.monitors.CompatibilityTracker``,
the monitor's own code) on the ``localized`` sequence at ``tiny`` from the shipped
pretrained start, as the worker learns it: one task after another, batches of 8, the worker's
learning rate and replay memory, an evaluation of every task's held-out probes every 25
updates (``FLAVA_MONITOR_EVERY``), lags 1, 2 and 4 evaluations (25, 50 and 100 updates).

Each task has 96 training clips (a task's 50 updates of 8 see each about 4 times). Arms,
paired seed by seed (the seed fixes the batches and the learner's draws):

- ``er`` vs ``derpp``: experience replay, and the same plus ``der_alpha`` x the MSE between
  the replayed clips' pooled embeddings now and those stored when they were learned (DER);
- ``flava`` vs ``flava-noder``: FLAVA, and FLAVA with its DER term's weight set to 0.

Per run and lag, the figure is the pooled ratio: the sum over windows (tasks) and
evaluations of cross-version R@1 over the sum of same-version R@1 (defined whenever any
same-version R@1 is above 0; a mean of per-window ratios would drop windows at 0). R@1 is
over each window's own probes (64): chance 1/64 = 1.6%.

Run: ``python -m bench.compat [--seeds 0 1 2] [--arms ...] [--workers 2] [--out DIR]
[--resume]`` (12 runs of 80 to 300 s each on one core; 28 minutes with 2 workers on this
shared machine, most of it waiting for the cores); writes
``DIR/runs/<arm>-s<seed>.json`` as runs finish, then ``DIR/results.json`` and
``DIR/summary.md``. ``--arms`` adds ``flava-der5`` (FLAVA, DER weight 5.0).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import logging
import math
import multiprocessing
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.continual.metrics import paired_test, stat
from bench.continual.sequences import (
    LocalizedSetConfig,
    cached_sequence,
    config_key,
    load_sequence,
)
from worker.builtin import builtin_path
from worker.core.clipset import ClipSet, batch_order, to_batch
from worker.core.learner import Batch, Learner, LearnerConfig, build_learner
from worker.core.localized import LocalizedConfig
from worker.core.model import preset
from worker.core.monitors import CompatibilityTracker, check_lags, embed_chunked
from worker.warmstart import warm_start

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results"
DIRECTIONS = ("a2v", "v2a")
LOG_FORMAT = "%(asctime)s %(processName)s %(name)s %(message)s"


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    der_alpha: float  # weight of the distillation term toward stored embeddings


KNOWN_ARMS = {
    arm.name: arm
    for arm in (
        Arm("er", "er", 0.5),  # no DER term at all (der_alpha unused)
        Arm("derpp", "derpp", 0.5),
        Arm("flava", "flava", 0.5),
        Arm("flava-noder", "flava", 0.0),
        Arm("flava-der5", "flava", 5.0),  # ten times the paper's weight
    )
}
ARMS = tuple(KNOWN_ARMS[n] for n in ("er", "derpp", "flava", "flava-noder"))
# (more distillation, less) compared seed by seed, where both arms ran
PAIRS = (
    ("derpp", "er"),
    ("flava", "flava-noder"),
    ("flava-der5", "flava-noder"),
    ("flava-der5", "flava"),
)


@dataclass(frozen=True)
class CompatConfig:
    preset: str = "tiny"
    data: LocalizedSetConfig = field(
        default_factory=lambda: LocalizedSetConfig(
            scene=LocalizedConfig(num_tasks=4),
            train_per_task=96,
            eval_per_task=64,  # probes per window: the monitor's default
            pretrain_train=2,  # unused: the runs start from the shipped pretrained weights
            pretrain_eval=2,
        )
    )
    batch: int = 8  # the worker's FLAVA_BATCH_SIZE
    steps_per_task: int = 50
    every: int = 25  # updates between evaluations (FLAVA_MONITOR_EVERY)
    lags: tuple[int, ...] = (1, 2, 4)  # FLAVA_MONITOR_COMPAT_LAGS
    lr: float = 1e-4  # the worker's FLAVA_LR
    memory_size: int = 2000  # the worker's replay memory (every clip of the run fits)
    arms: tuple[Arm, ...] = ARMS
    pairs: tuple[tuple[str, str], ...] = PAIRS
    seeds: tuple[int, ...] = (0, 1, 2)
    workers: int = 2
    out_dir: Path = RESULTS / "compat"
    cache_dir: Path = RESULTS / "cache"
    resume: bool = False  # reuse runs of the same settings found in out_dir/runs

    def run_key(self, arm: Arm, seed: int) -> str:
        """What makes a run's figures: everything but the other arms, seeds and workers."""
        parts = (self.preset, self.data, self.batch, self.steps_per_task, self.every)
        return config_key(*parts, self.lags, self.lr, self.memory_size, arm, seed)


@dataclass(frozen=True)
class Job:
    arm: Arm
    seed: int
    data_path: str
    cfg: CompatConfig

    @property
    def name(self) -> str:
        return f"{self.arm.name}-s{self.seed}"


def start_learner(arm: Arm, cfg: CompatConfig, seed: int) -> Learner:
    """The arm's learner from the shipped pretrained start, as a worker starts."""
    learner_cfg = LearnerConfig(
        lr=cfg.lr,
        seed=seed,
        memory_size=cfg.memory_size,
        der_alpha=arm.der_alpha,
        options={"pre_update_embeddings": False},  # the worker's published embeddings only
    )
    learner = build_learner(arm.method, preset(cfg.preset), learner_cfg)
    weights = builtin_path(cfg.preset)
    if weights is None:
        raise RuntimeError(f"no shipped pretrained weights for preset {cfg.preset!r}")
    warm_start(learner, weights)
    return learner


def probe_batch(clips: ClipSet) -> Batch:
    return to_batch(clips, torch.arange(len(clips)))


def evaluate(
    learner: Learner, tracker: CompatibilityTracker, probes: list[Batch], step: int
) -> list[dict[str, Any]]:
    """Embed every window's probes once (as the monitor does), record them under the
    learner's version, and return the cross-version figures of this evaluation."""
    version = f"0.{learner.step_count}"
    out = []
    for window, batch in enumerate(probes):
        for figure in tracker.record(str(window), version, step, *embed_chunked(learner, batch)):
            out.append({"window": window, **dataclasses.asdict(figure)})
    return out


def run_job(job: Job) -> dict[str, Any]:
    """One arm with one seed: the tasks in order, an evaluation every ``every`` updates."""
    torch.set_num_threads(1)
    cfg, started = job.cfg, time.perf_counter()
    seq = load_sequence(Path(job.data_path))
    learner = start_learner(job.arm, cfg, job.seed)
    probes = [probe_batch(held) for _, held in seq.tasks]
    tracker = CompatibilityTracker(cfg.lags)
    figures = evaluate(learner, tracker, probes, 0)
    step, der = 0, []
    for task, (train, _) in enumerate(seq.tasks):
        rng = np.random.default_rng([job.seed, task, 31])
        for idx in batch_order(len(train), cfg.steps_per_task, cfg.batch, rng):
            der.append(learner.step(to_batch(train, idx)).loss_der)
            step += 1
            if step % cfg.every == 0:
                figures += evaluate(learner, tracker, probes, step)
    logger.info("%s done in %.0f s", job.name, time.perf_counter() - started)
    return {
        "key": cfg.run_key(job.arm, job.seed),
        "commit": commit(),
        "arm": dataclasses.asdict(job.arm),
        "seed": job.seed,
        "updates": step,
        "skipped": learner.skipped_count,
        "mean_loss_der": float(np.mean(der)),
        "figures": figures,
        "by_lag": by_lag(figures, cfg.lags),
        "seconds": time.perf_counter() - started,
    }


def by_lag(figures: list[dict[str, Any]], lags: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Per lag: the pooled ratio per direction and over both, the mean same- and
    cross-version R@1 (%), the updates apart and how many (window, evaluation) terms."""
    out = {}
    for lag in lags:
        rows = [f for f in figures if f["lag"] == lag]
        if not rows:
            continue
        entry: dict[str, Any] = {"terms": len(rows), "updates_apart": rows[0]["updates_apart"]}
        entry["chance_r1"] = statistics.fmean(r["chance"] for r in rows)
        for d in (*DIRECTIONS, "both"):
            dirs = DIRECTIONS if d == "both" else (d,)
            same = sum(r["same"][x] for r in rows for x in dirs)
            cross = sum(r["cross"][x] for r in rows for x in dirs)
            entry[d] = {
                "ratio": cross / same if same > 0 else None,
                "same_r1": same / (len(rows) * len(dirs)),
                "cross_r1": cross / (len(rows) * len(dirs)),
            }
        out[str(lag)] = entry
    return out


# ---------------------------------------------------------------------------------------------
# over seeds


def aggregate(cfg: CompatConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm and lag: mean/std over seeds of the pooled ratio (both directions and each),
    same- and cross-version R@1; per pair and lag the paired tests on the ratio."""
    arms: dict[str, Any] = {}
    for arm in cfg.arms:
        mine = sorted((r for r in runs if r["arm"]["name"] == arm.name), key=lambda r: r["seed"])
        arms[arm.name] = {
            "method": arm.method,
            "der_alpha": arm.der_alpha if arm.method != "er" else None,
            "seeds": [r["seed"] for r in mine],
            "mean_loss_der": stat([r["mean_loss_der"] for r in mine]),
            "lags": {
                str(lag): {
                    f"{d}_{key}": stat([_get(r, lag, d, key) for r in mine])
                    for d in (*DIRECTIONS, "both")
                    for key in ("ratio", "same_r1", "cross_r1")
                }
                for lag in cfg.lags
            },
        }
    paired, paired_same = {}, {}
    for ours, theirs in cfg.pairs:
        a = {r["seed"]: r for r in runs if r["arm"]["name"] == ours}
        b = {r["seed"]: r for r in runs if r["arm"]["name"] == theirs}
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        pairs = [(a[s], b[s]) for s in seeds]
        name = f"{ours}_vs_{theirs}"
        paired[name] = {
            str(lag): {d: _paired(pairs, lag, d, "ratio") for d in (*DIRECTIONS, "both")}
            for lag in cfg.lags
        }
        paired_same[name] = {str(lag): _paired(pairs, lag, "both", "same_r1") for lag in cfg.lags}
    lags = runs[0]["by_lag"] if runs else {}
    return {
        "arms": arms,
        "paired": paired,  # the ratio, per direction and over both
        "paired_same_r1": paired_same,  # same-version R@1 (%), both directions
        "chance_r1": next(iter(lags.values()))["chance_r1"] if lags else None,
        "updates_apart": {lag: v["updates_apart"] for lag, v in lags.items()},
    }


def _paired(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]], lag: int, direction: str, key: str
) -> dict[str, Any]:
    """``paired_test`` of one figure over (ours, theirs) runs of the same seeds."""
    ours = [_get(a, lag, direction, key) for a, _ in pairs]
    return paired_test(ours, [_get(b, lag, direction, key) for _, b in pairs])


def _get(run: dict[str, Any], lag: int, direction: str, key: str) -> float:
    """One figure of a run at ``lag``: key "ratio", "same_r1" or "cross_r1" of a direction
    (or "both"); NaN when the lag was never reached or the ratio is undefined."""
    entry = run["by_lag"].get(str(lag))
    if entry is None:
        return math.nan
    value = entry[direction][key]
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------------------------------
# report


def markdown(cfg: CompatConfig, summary: dict[str, Any], meta: dict[str, Any]) -> str:
    chance = summary["chance_r1"]
    lines = [
        "# Cross-version retrieval, with and without DER (bench/compat.py)",
        "",
        f"`localized`, preset `{cfg.preset}`, {cfg.data.scene.num_tasks} tasks x "
        f"{cfg.steps_per_task} updates of {cfg.batch} clips from the shipped pretrained start, "
        f"lr {cfg.lr:g}, replay memory {cfg.memory_size}; every {cfg.every} updates each "
        f"task's {cfg.data.eval_per_task} held-out probes are embedded; seeds "
        f"{', '.join(map(str, cfg.seeds))}; runs at commit {', '.join(meta['run_commits'])} "
        f"({meta['run_seconds'] / 60:.0f} min of runs), reported at {meta['commit']}.",
        "",
        "Ratio = cross-version R@1 (current-version queries against the gallery embedded k "
        "evaluations earlier) / same-version R@1 on the same probes, pooled over the windows "
        "and evaluations of a run (sum over sum), both directions; 1.0 = an index built by "
        f"the old version serves as well as a fresh one. R@1 chance = {chance:.2f}% (1 of "
        f"{cfg.data.eval_per_task}).",
        "",
        "| arm | DER weight | lag (updates) | ratio mean ± std | same-version R@1 % | "
        "cross-version R@1 % |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in summary["arms"].items():
        for lag in map(str, cfg.lags):
            f = arm["lags"][lag]
            apart = summary["updates_apart"].get(lag)
            lines.append(
                f"| {name} | {_num(arm['der_alpha'], 1)} | {lag} ({apart}) | "
                f"{_pm(f['both_ratio'], 3)} | {_pm(f['both_same_r1'], 2)} (chance "
                f"{chance:.2f}) | {_pm(f['both_cross_r1'], 2)} (chance {chance:.2f}) |"
            )
    ratio_tests = {
        pair: {lag: tests["both"] for lag, tests in by_lag_.items()}
        for pair, by_lag_ in summary["paired"].items()
    }
    lines += _paired_table("the ratio over both directions", ratio_tests, 3)
    lines += _paired_table(
        f"same-version R@1 (%, chance {chance:.2f}): DER's effect on retrieval itself",
        summary["paired_same_r1"],
        2,
    )
    return "\n".join(lines) + "\n"


def _paired_table(what: str, tests: dict[str, dict[str, Any]], digits: int) -> list[str]:
    lines = [
        "",
        f"Paired over seeds (more distillation minus less), {what}:",
        "",
        "| pair | lag | mean diff ± std | t-test p | Wilcoxon p | diffs |",
        "|---|---|---|---|---|---|",
    ]
    for pair, by_lag_ in tests.items():
        for lag, t in by_lag_.items():
            diffs = ", ".join(f"{x:+.{digits}f}" for x in t["diffs"])
            lines.append(
                f"| {pair} | {lag} | {_num(t['mean_diff'], digits)} ± "
                f"{_num(t['std_diff'], digits)} | {_num(t['t_p'], 3)} | "
                f"{_num(t['wilcoxon_p'], 3)} | {diffs} |"
            )
    return lines


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(s: dict[str, Any], digits: int) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {_num(s['std'], digits)}"


# ---------------------------------------------------------------------------------------------
# orchestration


def run(cfg: CompatConfig) -> dict[str, Any]:
    started = time.perf_counter()
    model = preset(cfg.preset)
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with cf.ProcessPoolExecutor(
        cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=(level,)
    ) as pool:
        data = cached_sequence("localized", cfg.data, model, cfg.cache_dir, pool)
        jobs = [Job(arm, seed, str(data), cfg) for seed in cfg.seeds for arm in cfg.arms]
        done: dict[str, dict[str, Any]] = {}
        for job in jobs if cfg.resume else []:
            if (reused := _reusable(job)) is not None:
                done[job.name] = reused
        todo = [job for job in jobs if job.name not in done]
        logger.info("%d runs to do, %d reused", len(todo), len(jobs) - len(todo))
        for job, result in zip(todo, pool.map(run_job, todo), strict=True):
            done[job.name] = result
            _run_path(job).parent.mkdir(parents=True, exist_ok=True)
            _run_path(job).write_text(json.dumps(result, indent=1) + "\n")
        runs = [done[job.name] for job in jobs]
    meta = {
        "commit": commit(),  # HEAD when this report was written
        "run_commits": sorted({r["commit"] for r in runs}),  # HEAD when each run ran
        "seconds": time.perf_counter() - started,  # this invocation (reused runs: ~0)
        "run_seconds": sum(r["seconds"] for r in runs),  # one core each, 2 at a time
    }
    summary = aggregate(cfg, runs)
    report = {"config": _plain(cfg), "meta": meta, "summary": summary, "runs": runs}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "results.json").write_text(results_json(report))
    (cfg.out_dir / "summary.md").write_text(markdown(cfg, summary, meta))
    return report


FIGURE_COLUMNS = (
    "window",
    "lag",
    "query_step",
    "gallery_step",
    "probes",
    "same_a2v",
    "same_v2a",
    "cross_a2v",
    "cross_v2a",
)


def results_json(report: dict[str, Any]) -> str:
    """The report as JSON, each run's figures as one compact row per line (FIGURE_COLUMNS;
    versions are "0.<step>", ratios = cross / same)."""
    runs = []
    for r in report["runs"]:
        rows = [
            [f["window"], f["lag"], f["query_step"], f["gallery_step"], f["probes"]]
            + [round(f[side][d], 4) for side in ("same", "cross") for d in DIRECTIONS]
            for f in r["figures"]
        ]
        runs.append({**{k: v for k, v in r.items() if k != "figures"}, "figures": rows})
    text = json.dumps({**report, "figure_columns": FIGURE_COLUMNS, "runs": runs}, indent=1)
    # one row per line: a row's numbers, indented one per line, joined back
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", _one_line, text) + "\n"


def _one_line(match: re.Match[str]) -> str:
    return "[" + " ".join(match.group(1).split()) + "]"


def _run_path(job: Job) -> Path:
    return job.cfg.out_dir / "runs" / f"{job.name}.json"


def _reusable(job: Job) -> dict[str, Any] | None:
    """A finished run of the same settings (``run_key``), else None."""
    path = _run_path(job)
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("key") == job.cfg.run_key(job.arm, job.seed) else None


def _init_worker(level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)


def _plain(cfg: CompatConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compat", description=__doc__)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=sorted(KNOWN_ARMS), default=[a.name for a in ARMS])
    p.add_argument("--resume", action="store_true", help="reuse finished runs in OUT/runs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps-per-task", type=int, default=CompatConfig.steps_per_task)
    p.add_argument("--every", type=int, default=CompatConfig.every, help="updates between evals")
    p.add_argument("--lags", nargs="+", type=int, default=list(CompatConfig.lags))
    p.add_argument("--lr", type=float, default=CompatConfig.lr, help="Adam lr of the backbone")
    p.add_argument("--out", type=Path, default=RESULTS / "compat")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cfg = CompatConfig(
        arms=tuple(KNOWN_ARMS[n] for n in args.arms),
        resume=args.resume,
        seeds=tuple(args.seeds),
        workers=args.workers,
        steps_per_task=args.steps_per_task,
        every=args.every,
        lags=check_lags(args.lags),
        lr=args.lr,
        out_dir=args.out,
    )
    run(cfg)
    print((cfg.out_dir / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
