"""The report: table.md, matrices.md, results.json, summary.json and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.continual.aggregate import summary_json
from bench.continual.config import FLAVA_FAMILY, MULTITASK
from bench.continual.metrics import DIRECTIONS

_ARROW = {"a2v": "a→v", "v2a": "v→a"}
_MAIN = [(d, k) for d in DIRECTIONS for k in ("A_r1", "F_r1", "A_avg", "F_avg")]
_KEY_NAME = {"A_avg": "Avg A ↑", "F_avg": "Avg F ↓", "A_r1": "R@1 A ↑", "F_r1": "R@1 F ↓"}


def _fmt(s: dict[str, Any], digits: int = 1) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['mean']:.{digits}f}" + ("" if s["std"] is None else f" ± {s['std']:.{digits}f}")


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(head), _row(["---"] * len(head))] + [_row(r) for r in rows]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main_table(seq: dict[str, Any], view: str) -> list[str]:
    """Per method A and F of R@1 and Avg, both directions; chance and the pretrained start."""
    head = ["Method", "seeds"] + [f"{_ARROW[d]} {_KEY_NAME[k]}" for d, k in _MAIN]
    rows = []
    if view == "instance":
        c = seq["chance"]
        rows.append(["chance", "–"] + [_num(c[k[2:]], 2) if k[0] == "A" else "–" for _, k in _MAIN])
    start = [log[view] for log in seq["pretrain"]["start_retrieval"]]
    rows.append(["start (pretrained)", str(len(start))] + [_start(start, d, k) for d, k in _MAIN])
    for method, agg in seq["methods"].items():
        s = agg["summary"][view]
        rows.append([method, str(len(agg["seeds"]))] + [_fmt(s[d][k]) for d, k in _MAIN])
    return _table(head, rows)


def _start(evals: list[list[dict]], d: str, key: str) -> str:
    """A of the pretrained checkpoints (mean over seeds of the mean over tasks)."""
    if key[0] != "A":
        return "–"
    return f"{np.mean([np.mean([e[d][key[2:]] for e in ev]) for ev in evals]):.1f}"


def paired_table(seq: dict[str, Any]) -> list[str]:
    head = [
        "comparison (instance a→v)",
        "figure",
        "seeds",
        "mean diff",
        "std diff",
        "t-test p",
        "Wilcoxon p",
    ]
    rows = [
        [
            name,
            key,
            str(t["n"]),
            _num(t["mean_diff"]),
            _num(t["std_diff"]),
            _num(t["t_p"], 3),
            _num(t["wilcoxon_p"], 3),
        ]
        for name, cmp in seq["paired"].items()
        for key, t in cmp["tests"].items()
    ]
    return _table(head, rows)


_AVM_COLUMNS = ("match_acc", "auc", "auc_shuffled", "object_recall")


def diagnostics_table(seq: dict[str, Any]) -> list[str]:
    """AVM per task (mean over seeds): after pretraining, then after each task (FLAVA family)."""
    pre = seq["pretrain"]["unseen_avm_per_task"]
    head = [
        "Method",
        "after",
        "match acc per task",
        "loc. AUC",
        "shuffled-audio AUC",
        "object recall",
        "excluded by corr.",
    ]
    rows = [["(pretrained)", "–"] + [_list(pre[k]) for k in _AVM_COLUMNS] + ["–"]]
    for method, agg in seq["methods"].items():
        probes = agg["avm_after_tasks"]
        if method not in FLAVA_FAMILY or not probes:
            continue
        excluded = np.mean(
            [[t["frac_excluded"] for t in ts] for ts in agg["tasks"].values()], axis=0
        )
        for after, row in enumerate(zip(*(probes[k] for k in _AVM_COLUMNS), strict=True)):
            rows.append([method, f"T{after + 1}", *map(_list, row), f"{excluded[after]:.3f}"])
    return _table(head, rows)


def _list(values: list[float]) -> str:
    return " / ".join(_num(v) for v in values)


def targets_lines(seq: dict[str, Any]) -> list[str]:
    out = []
    for name, t in seq["targets"].items():
        met = {None: "n/a", True: "met", False: "**missed**"}[t["met"]]
        out.append(f"- {name}: {_num(t['value'])} — {met}")
    f_er = seq["targets"]["F_er >= 5 (ratios meaningful)"]
    if not f_er["met"]:
        out.append("- ER forgets less than 5 points here: the F ratios are not meaningful.")
    return out


def time_lines(seq: dict[str, Any]) -> list[str]:
    t = seq["time"]
    gen = "this invocation" if t["clip_generation_now"] else "cached, an earlier invocation"
    return [
        f"- clip generation: {t['clip_generation']:.0f} s ({gen})",
        f"- pretraining: {t['pretraining']:.0f} s over {len(seq['pretrain']['backbone_loss'])} "
        f"seeds (seeds pretrained now: {t['pretrained_now']}), + {t['pretraining_eval']:.0f} s "
        "measuring the starts",
        f"- {t['runs']} runs: training {t['runs_train']:.0f} s, retrieval evaluation "
        f"{t['runs_eval']:.0f} s, AVM diagnostics {t['runs_probe']:.0f} s (process seconds; "
        "runs go in parallel)",
    ]


def pretrain_lines(seq: dict[str, Any]) -> list[str]:
    p = seq["pretrain"]
    loss = " ; ".join(f"{_num(a, 3)} -> {_num(b, 3)}" for a, b in p["backbone_loss"])
    acc = " ; ".join(f"{_num(a)} -> {_num(b)}" for a, b in p["avm_train_acc"])
    held, unseen = p["heldout_avm"], p["unseen_avm"]
    return [
        f"- pretraining per seed: {_fmt(p['seconds'], 0)} s; backbone loss {loss}; AVM train "
        f"accuracy {acc}",
        f"- AVM on the pretraining split's held-out clips: matching accuracy "
        f"{_fmt(held['match_acc'], 2)}, localization AUC {_fmt(held['auc'], 2)}",
        f"- AVM on the tasks' held-out clips (unseen in pretraining): matching accuracy "
        f"{_fmt(unseen['match_acc'], 2)}, localization AUC {_fmt(unseen['auc'], 2)} "
        f"(shuffled audio {_fmt(unseen['auc_shuffled'], 2)}), object recall of candidates "
        f"{_fmt(unseen['object_recall'], 2)} (chance 0.5)",
    ]


def efficiency_table(seq: dict[str, Any]) -> list[str]:
    keys = (
        "step_seconds",
        "clips_per_second",
        "peak_train_rss_mb",
        "train_rss_increase_mb",
        "replay_memory_mb",
    )
    head = ["Method", "step s", "clips/s", "peak train RSS MB", "RSS increase MB", "replay MB"]
    rows = [
        [m] + [_fmt(agg["efficiency"][k], 2 if k == "step_seconds" else 1) for k in keys]
        for m, agg in seq["methods"].items()
    ]
    return _table(head, rows)


def probe_efficiency_table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["Method", "step s", "clips/s", "peak RSS MB", "peak - base MB"]
    head += ["step peak - steady MB", "replay MB", "video tokens kept"]
    keys = ("step_seconds", "clips_per_second", "peak_rss_mb", "total_increase_mb")
    keys += ("step_peak_mb", "replay_memory_mb", "tokens_kept_v")
    return _table(head, [[e["method"]] + [f"{e[k]:.4g}" for k in keys] for e in rows])


def header(report: dict[str, Any]) -> list[str]:
    meta, cfg = report["meta"], report["meta"]["config"]
    t = cfg["train"]
    reused = meta.get("runs_reused")
    start = cfg.get("start")
    starts = (
        f"every seed starts from `{start}` (a `flava pretrain` file; no pretraining here)"
        if start
        else f"every seed pretrained on its own ({cfg['pretrain']['steps']} backbone + "
        f"{cfg['pretrain']['avm_steps']} AVM updates)"
    )
    return [
        f"# Continual benchmark ({meta['mode']} mode)",
        "",
        f"`python -m bench.continual --mode {meta['mode']}"
        + (f" --start {start}" if start else "")
        + "`: wall time "
        f"{meta['wall_seconds'] / 60:.1f} min on {meta['cpus']} CPUs, {meta['workers']} runs in "
        f"parallel (preparing {meta['prepare_seconds']:.0f} s, runs {meta['runs_seconds']:.0f} s, "
        f"efficiency {meta['efficiency_seconds']:.0f} s)"
        + (
            f"; {reused} of {meta['runs_total']} runs reused from earlier invocations"
            if reused
            else ""
        )
        + f"; load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end; "
        f"torch {meta['torch']}. Preset `{t['preset']}`, batch {t['batch']} (+ as many replayed;"
        f" multitask {2 * t['batch']} per update), {t['steps_per_task']} updates per task, lr "
        f"{t['lr']}, replay memory {t['memory_size']} clips; {starts}. "
        f"Code: commit {meta['code']['commit'][:10]}"
        + (f", uncommitted: {meta['code']['uncommitted']}" if meta["code"]["uncommitted"] else ""),
        "",
        "Headline: **instance-level** hits (a query's own pair is the one correct item) against "
        "the **union of all tasks' held-out sets**; chance R@K = K / gallery size. A = mean of "
        "the final row of R[l][k], F = 1/(T-1) sum_{k<T} max_{l<T} (R[l][k] - R[T][k]); "
        "%-points, mean ± std over seeds; Avg = mean of R@1/5/10.",
        "",
    ]


def table_markdown(report: dict[str, Any]) -> str:
    meta, out = report["meta"], header(report)
    if meta["missing_methods"]:
        out += [
            "Missing methods: "
            + "; ".join(f"`{m}` ({w})" for m, w in meta["missing_methods"].items()),
            "",
        ]
    out += [f"**{name} skipped**: {why}\n" for name, why in meta["skipped_sequences"].items()]
    if report.get("efficiency"):
        out += [
            "## Efficiency, one method at a time (fresh process, first task, after warm-up steps)",
            "",
        ]
        out += probe_efficiency_table(report["efficiency"]) + [""]
    for name, seq in report["sequences"].items():
        out += [f"## {name}: " + "; ".join(seq["task_names"]), ""]
        out += ["Targets:", ""] + targets_lines(seq) + [""]
        out += ["Where the time went:", ""] + time_lines(seq) + [""]
        out += pretrain_lines(seq) + [""]
        out += [f"Instance level, union gallery of {seq['gallery']} clips:", ""]
        out += main_table(seq, "instance") + [""]
        out += ["Paired over seeds (ours - theirs; F and A of instance a→v):", ""]
        out += paired_table(seq) + [""]
        out += [
            "AVM diagnostics on each task's held-out set, T1 / T2 / ... (mean over seeds): "
            "matching accuracy (chance 0.5), localization AUC of I_v, object vs distractor "
            "tokens (chance 0.5), the same with another clip's audio (control, should be near "
            "0.5), object recall of the top-half candidates (chance 0.5), share of candidate "
            "tokens excluded by correlation (step mean over the task):",
            "",
        ]
        out += diagnostics_table(seq) + [""]
        out += [
            "Secondary view, label level: a hit is any clip of the query's class (synthetic) / "
            "sounding shape (localized) inside its own task's gallery; chance is the share of "
            "that gallery with the query's label, not K / N. Not the protocol's figure.",
            "",
        ]
        out += main_table(seq, "label") + [""]
        out += ["Efficiency during the runs (parallel runs, shared machine):", ""]
        out += efficiency_table(seq) + [""]
    return "\n".join(out)


def matrices_markdown(report: dict[str, Any]) -> str:
    """R[l][k] (mean over seeds), instance level, rows after each task."""
    out = ["# Accuracy matrices R[l][k] (instance level, union gallery, mean over seeds)", ""]
    for name, seq in report["sequences"].items():
        T = len(seq["task_names"])
        for method, agg in seq["methods"].items():
            for d in DIRECTIONS:
                for m in ("r1", "avg"):
                    out += [
                        f"### {name} / {method} / {_ARROW[d]} {m} (chance {seq['chance'][m]:.2f})",
                        "",
                    ]
                    R = agg["matrices"]["instance"][d][m]
                    label = "all (joint)" if method == MULTITASK else None
                    rows = [
                        [label or f"T{i + 1}"] + [f"{x:.1f}" for x in row]
                        for i, row in enumerate(R)
                    ]
                    out += _table(["after"] + [f"T{k + 1}" for k in range(T)], rows) + [""]
    return "\n".join(out)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """table.md, matrices.md, results.json, summary.json and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(_json_safe(report), indent=1))
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary_json(report)), indent=1))
    (out_dir / "table.md").write_text(table_markdown(report) + "\n")
    (out_dir / "matrices.md").write_text(matrices_markdown(report) + "\n")
    for name, seq in report["sequences"].items():
        plot_r1(name, seq, out_dir / f"r1_{name}.png")
    if report.get("efficiency"):
        plot_efficiency(report, out_dir / "memory_throughput.png")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_r1(name: str, seq: dict[str, Any], path: Path) -> None:
    """One panel per method: instance a→v R@1 of each task after each task (0 = start)."""
    plt = _pyplot()
    methods = [m for m in seq["methods"] if m != MULTITASK]
    cols = min(4, max(1, len(methods)))
    rows = max(1, math.ceil(len(methods) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    starts = [
        [e["a2v"]["r1"] for e in log["instance"]] for log in seq["pretrain"]["start_retrieval"]
    ]
    joint = seq["methods"].get(MULTITASK)
    for ax, method in zip(axes.flat, methods, strict=False):
        R = np.vstack(
            [np.mean(starts, axis=0), seq["methods"][method]["matrices"]["instance"]["a2v"]["r1"]]
        )
        for k in range(R.shape[1]):
            ax.plot(range(R.shape[0]), R[:, k], marker="o", ms=3, label=f"T{k + 1}")
        ax.axhline(seq["chance"]["r1"], color="k", ls=":", lw=1, label="chance")
        if joint is not None:
            a = np.mean(joint["matrices"]["instance"]["a2v"]["r1"][-1])
            ax.axhline(a, color="grey", ls="--", lw=1, label="multitask A")
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(R.shape[0]))
        ax.set_xlabel("after task", fontsize=8)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("instance a→v R@1 (%)")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{name}: instance a→v R@1 of each task, union gallery (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_efficiency(report: dict[str, Any], path: Path) -> None:
    """Memory vs throughput of each method, measured one at a time."""
    plt = _pyplot()
    panels = (
        ("total_increase_mb", "peak RSS - RSS before the learner (MB)"),
        ("step_peak_mb", "peak RSS within a step - steady RSS (MB)"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for e in report["efficiency"]:
            ax.scatter([e["clips_per_second"]], [e[key]])
            ax.annotate(e["method"], (e["clips_per_second"], e[key]), fontsize=8)
        ax.set_xlabel("training throughput (clips/s, current clips)")
        ax.set_ylabel(label)
    fig.suptitle("Memory vs throughput (batch 8 + replay, one method at a time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
