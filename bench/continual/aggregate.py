"""Over seeds: each method's figures (mean, std), paired comparisons, the AVM after
pretraining, the issue's targets, where the time went; and the compact summary.json."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.continual.config import PAIRS
from bench.continual.metrics import DIRECTIONS, METRICS, VIEWS, chance, matrix, paired_test, stat

HEADLINE = ("instance", "a2v")  # the summary metric: instance-level a->v, R@1 (and Avg)
PAIRED_KEYS = ("F_r1", "A_r1", "F_avg", "A_avg")
AVM_KEYS = ("match_acc", "auc", "auc_shuffled", "object_recall")


def aggregate(prepared: list[Any], results: list[dict]) -> dict[str, Any]:
    """{"sequences": {name: everything the report shows about it}}."""
    out: dict[str, Any] = {"sequences": {}}
    for p in prepared:
        runs = [r for r in results if r["job"]["sequence"] == p.name]
        methods = dict.fromkeys(r["job"]["method"] for r in runs)
        by_method = {
            m: aggregate_method([r for r in runs if r["job"]["method"] == m]) for m in methods
        }
        logs = [p.pretrain_logs[s] for s in sorted(p.pretrain_logs)]
        gallery = logs[0]["start_retrieval"]["gallery"]
        seq = {
            "task_names": p.task_names,
            "gallery": gallery,
            "chance": chance(gallery),
            "pretrain": pretrain_summary(logs),
            "methods": by_method,
            "paired": paired(by_method),
            "time": time_summary(p, runs),
        }
        seq["targets"] = targets(seq)
        out["sequences"][p.name] = seq
    return out


def aggregate_method(runs: list[dict]) -> dict[str, Any]:
    """One method on one sequence over its seeds."""
    runs = sorted(runs, key=lambda r: r["job"]["seed"])
    summary = {
        view: {
            d: {
                k: stat([r["summary"][view][d][k] for r in runs])
                for k in runs[0]["summary"][view][d]
            }
            for d in DIRECTIONS
        }
        for view in VIEWS
    }
    matrices = {
        view: {d: {m: _mean_matrix(runs, view, d, m) for m in METRICS} for d in DIRECTIONS}
        for view in VIEWS
    }
    return {
        "seeds": [r["job"]["seed"] for r in runs],
        "summary": summary,
        "matrices": matrices,
        "efficiency": {k: stat([r["efficiency"][k] for r in runs]) for k in runs[0]["efficiency"]},
        "seconds": {k: stat([r["seconds"][k] for r in runs]) for k in runs[0]["seconds"]},
        "tasks": {r["job"]["seed"]: r["tasks"] for r in runs},
        "avm_probes": {r["job"]["seed"]: r["avm_probes"] for r in runs},
        "avm_after_tasks": _probe_means(runs),
    }


def _mean_matrix(runs: list[dict], view: str, direction: str, metric: str) -> list[list[float]]:
    mats = np.array([matrix(r["rows"], view, direction, metric) for r in runs])
    return mats.mean(axis=0).tolist()


def _probe_means(runs: list[dict]) -> dict[str, list[list[float]]]:
    """{figure: [after task l][task k]} AVM diagnostics, mean over seeds (empty: no AVM)."""
    probed = [r["avm_probes"] for r in runs if r["avm_probes"]]
    if not probed:
        return {}
    return {
        key: np.nanmean([[[c[key] for c in row] for row in p] for p in probed], axis=0).tolist()
        for key in AVM_KEYS
    }


def pretrain_summary(logs: list[dict]) -> dict[str, Any]:
    """The pretrained starts over seeds: held-out AVM, start retrieval, AVM on each unseen task."""
    start = [log["start_avm"] for log in logs]  # [seed][task] diagnostics
    per_task = {
        k: np.nanmean([[t[k] for t in s] for s in start], axis=0).tolist() for k in AVM_KEYS
    }
    return {
        "seconds": stat([log["seconds"] for log in logs]),
        "eval_seconds": stat([log["eval_seconds"] for log in logs]),
        "backbone_loss": [_ends(log["backbone_loss"]) for log in logs],
        "avm_train_acc": [_ends(log["avm_train_acc"]) for log in logs],
        "heldout_avm": {k: stat([log["heldout_avm"][k] for log in logs]) for k in AVM_KEYS},
        # the tasks' held-out clips, which the pretraining never saw (mean over tasks per seed)
        "unseen_avm": {k: stat([np.nanmean([t[k] for t in s]) for s in start]) for k in AVM_KEYS},
        "unseen_avm_per_task": per_task,
        "start_retrieval": [log["start_retrieval"] for log in logs],
    }


def _ends(curve: list[float], n: int = 20) -> tuple[float | None, float | None]:
    """Mean of the first and of the last ``n`` values of a per-step curve."""
    if not curve:
        return None, None
    return float(np.mean(curve[:n])), float(np.mean(curve[-n:]))


def _headline(agg: dict[str, Any], key: str) -> dict[int, float]:
    """{seed: value} of a headline figure (instance a->v) of one method."""
    view, d = HEADLINE
    return dict(zip(agg["seeds"], agg["summary"][view][d][key]["values"], strict=False))


def paired(methods: dict[str, Any]) -> dict[str, Any]:
    """Seed-by-seed tests of each PAIRS comparison on the headline figures (shared seeds)."""
    out = {}
    for ours, theirs in PAIRS:
        if ours not in methods or theirs not in methods:
            continue
        tests = {}
        for key in PAIRED_KEYS:
            x, y = _headline(methods[ours], key), _headline(methods[theirs], key)
            seeds = sorted(set(x) & set(y))
            tests[key] = {
                "seeds": seeds,
                **paired_test([x[s] for s in seeds], [y[s] for s in seeds]),
            }
        out[f"{ours}_vs_{theirs}"] = {
            "p_value": tests["F_r1"]["t_p"],  # paired t-test on F (instance a->v R@1)
            "p_value_wilcoxon": tests["F_r1"]["wilcoxon_p"],
            "mean_diff_F": tests["F_r1"]["mean_diff"],
            "mean_diff_A": tests["A_r1"]["mean_diff"],
            "tests": tests,
        }
    return out


def time_summary(p: Any, runs: list[dict]) -> dict[str, Any]:
    """Where the time goes (seconds of one process each; runs went in parallel)."""
    logs = p.pretrain_logs.values()
    return {
        "clip_generation": p.build_seconds,
        "clip_generation_now": p.built_now,
        "pretraining": sum(log["seconds"] for log in logs),
        "pretraining_eval": sum(log["eval_seconds"] for log in logs),
        "pretrained_now": p.pretrained_now,
        "runs_train": sum(r["seconds"]["train"] for r in runs),
        "runs_eval": sum(r["seconds"]["eval"] for r in runs),
        "runs_probe": sum(r["seconds"]["probe"] for r in runs),
        "runs": len(runs),
    }


def targets(seq: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured value and whether it is met."""
    methods, avm = seq["methods"], seq["pretrain"]["unseen_avm"]

    def mean(method: str, key: str) -> float | None:
        if method not in methods:
            return None
        return methods[method]["summary"][HEADLINE[0]][HEADLINE[1]][key]["mean"]

    f_flava, f_er, f_der = mean("flava", "F_r1"), mean("er", "F_r1"), mean("derpp", "F_r1")
    a_flava, a_der = mean("flava", "A_r1"), mean("derpp", "A_r1")
    return {
        "avm_matching_acc_unseen >= 0.85": _check(avm["match_acc"]["mean"], lambda x: x >= 0.85),
        "localization_auc >= 0.85": _check(avm["auc"]["mean"], lambda x: x >= 0.85),
        "localization_auc_shuffled < 0.6": _check(avm["auc_shuffled"]["mean"], lambda x: x < 0.6),
        "F_er >= 5 (ratios meaningful)": _check(f_er, lambda x: x >= 5.0),
        "F_flava <= 0.5 F_er": _ratio(f_flava, f_er, 0.5),
        "F_flava <= 0.8 F_derpp": _ratio(f_flava, f_der, 0.8),
        "A_flava >= A_derpp": _check(
            None if a_flava is None or a_der is None else a_flava - a_der, lambda x: x >= 0
        ),
    }


def _check(value: float | None, ok: Any) -> dict[str, Any]:
    return {"value": value, "met": None if value is None else bool(ok(value))}


def _ratio(ours: float | None, theirs: float | None, bound: float) -> dict[str, Any]:
    if ours is None or theirs is None or theirs <= 0:
        return {"value": None, "met": None}
    return {"value": ours / theirs, "met": ours / theirs <= bound}


def summary_json(report: dict[str, Any]) -> dict[str, Any]:
    """The compact per-sequence summary (bench/results/continual/summary.json)."""
    out = {}
    for name, seq in report["sequences"].items():
        avm = seq["pretrain"]["unseen_avm"]
        out[name] = {
            "chance": seq["chance"]["r1"],
            "chance_r5": seq["chance"]["r5"],
            "chance_r10": seq["chance"]["r10"],
            "gallery": seq["gallery"],
            "methods": {
                m: {
                    "A": mean_of(agg, "A_r1"),
                    "F": mean_of(agg, "F_r1"),
                    "A_avg": mean_of(agg, "A_avg"),
                    "F_avg": mean_of(agg, "F_avg"),
                    "seeds": agg["seeds"],
                }
                for m, agg in seq["methods"].items()
            },
            "avm": {
                "matching_acc_unseen": avm["match_acc"]["mean"],
                "localization_auc": avm["auc"]["mean"],
                "localization_auc_shuffled": avm["auc_shuffled"]["mean"],
                "object_recall": avm["object_recall"]["mean"],
            },
            "paired": {
                k: {
                    kk: v[kk]
                    for kk in ("p_value", "p_value_wilcoxon", "mean_diff_F", "mean_diff_A")
                }
                for k, v in seq["paired"].items()
            },
            "targets": seq["targets"],
        }
    return out


def mean_of(agg: dict[str, Any], key: str) -> float | None:
    return agg["summary"][HEADLINE[0]][HEADLINE[1]][key]["mean"]
