"""Shared pieces of the performance benchmarks: summary statistics, the comparison record,
fresh processes, peak-memory probes and the report writers.

A ``Comparison`` holds two measurements of the same thing taken in the same run, ours and a
reference, as ``Stats`` (median, p10, p90, p99 of the samples), and ``ratio = ours.median /
reference.median``; its ``target`` says which side of the ratio is good.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import resource
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements of one quantity, in ``unit``."""

    unit: str
    n: int
    median: float
    p10: float
    p90: float
    p99: float

    @classmethod
    def of(cls, samples: Sequence[float], unit: str) -> Stats:
        if not samples:
            raise ValueError(f"no samples to summarise ({unit})")
        x = np.asarray(samples, dtype=np.float64)
        p10, p50, p90, p99 = np.percentile(x, [10, 50, 90, 99])
        return cls(unit, len(x), float(p50), float(p10), float(p90), float(p99))

    def text(self, digits: int = 3) -> str:
        """ "median [p10-p90] unit" with ``digits`` significant digits."""
        f = f"{{:.{digits}g}}"
        spread = f"[{f.format(self.p10)}-{f.format(self.p90)}]"
        return f"{f.format(self.median)} {spread} {self.unit} (n={self.n})"


@dataclass
class Comparison:
    """Ours against a reference, measured side by side; ratio = ours / reference medians."""

    bench: str  # short name: decode, step-time, step-memory, service, ingest, embed
    title: str  # what is compared, in words
    ours_label: str
    ours: Stats
    ref_label: str
    ref: Stats | None  # None when the reference could not be measured (then ratio is None)
    target: str = ""  # "<= 1.0" (lower is better) or ">= 0.8" (higher is better); "" = none
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return None if self.ref is None else self.ours.median / self.ref.median

    @property
    def met(self) -> bool | None:
        """Whether the ratio meets the target (None: no target, or nothing to compare)."""
        ratio, target = self.ratio, self.target
        if ratio is None or not target:
            return None
        op, bound = target.split()
        return ratio <= float(bound) if op == "<=" else ratio >= float(bound)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


# ---------------------------------------------------------------------------------------
# processes and memory


def in_fresh_process(
    fn: Callable[..., Any], *args: Any, initializer=None, env: dict[str, str | None] | None = None
) -> Any:
    """``fn(*args)`` in a newly spawned Python process (own memory peak, own torch threads).

    ``env`` changes its environment (None removes a variable), e.g. OpenMP settings that must
    be in place before torch loads."""
    context = multiprocessing.get_context("spawn")
    with environ(env or {}):  # the child starts on submit: inside the block
        with ProcessPoolExecutor(1, mp_context=context, initializer=initializer) as pool:
            return pool.submit(fn, *args).result()


def in_fresh_processes(fn: Callable[..., Any], argsets: list[tuple]) -> list[Any]:
    """``fn(*args)`` for every args in ``argsets``, concurrently, each in its own new process.

    For measurements that do not depend on timing (memory), so they may share the CPUs."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(argsets), mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(fn, *args) for args in argsets]
        return [f.result() for f in futures]


@contextlib.contextmanager
def environ(changes: dict[str, str | None]) -> Iterator[None]:
    """Apply ``changes`` to os.environ for the block (children spawned inside inherit them)."""
    saved = {k: os.environ.get(k) for k in changes}
    try:
        for key, value in changes.items():
            _set_env(key, value)
        yield
    finally:
        for key, value in saved.items():
            _set_env(key, value)


def _set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    return status_kb("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Return freed heap to the OS, then reset this process's peak RSS (VmHWM) to its current
    RSS (Linux >= 4.0), so the next reading is the peak of what runs in between; False if
    unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak RSS since the last ``reset_peak_rss`` (VmHWM), else since the process started."""
    hwm = status_kb("VmHWM")
    return hwm * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def status_kb(field_name: str) -> int:
    """A /proc/self/status field in kB (VmRSS, VmHWM); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_note() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    cpus = os.cpu_count() or 0
    return f"{cpus} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"


# ---------------------------------------------------------------------------------------
# reports


def write_json(path: Path, comparisons: list[Comparison], meta: dict[str, Any]) -> None:
    body = {"meta": meta, "comparisons": [c.as_dict() for c in comparisons]}
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")


def markdown(
    comparisons: list[Comparison],
    meta: dict[str, Any],
    title: str = "Performance benchmarks",
    command: str | None = None,
) -> str:
    command = command or f"python -m bench.perf{' --quick' if meta.get('quick') else ''}"
    lines = [
        f"# {title}",
        "",
        f"Produced by `{command}` "
        f"at {meta.get('started', '?')} ({meta.get('wall_s', '?')} s); {meta.get('machine', '')}.",
        "Each row measures ours and its reference in the same run; ratio = ours / reference "
        "(medians), spread = [p10-p90].",
        "",
        "| benchmark | ours | reference | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_row(c) for c in comparisons]
    for c in comparisons:
        lines += ["", f"## {c.bench}: {c.title}", ""]
        lines += [f"- {note}" for note in c.notes]
        lines += _extra_lines(c.extra)
    return "\n".join(lines) + "\n"


def _row(c: Comparison) -> str:
    ratio = "n/a" if c.ratio is None else f"{c.ratio:.3g}"
    met = {None: "-", True: "yes", False: "**no**"}[c.met]
    ref = "MISSING" if c.ref is None else f"{c.ref_label}: {c.ref.text()}"
    return f"| {c.bench} | {c.ours_label}: {c.ours.text()} | {ref} | {ratio} | {c.target} | {met} |"


def _extra_lines(extra: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, value in extra.items():
        if isinstance(value, str) and "\n" in value:
            lines += ["", f"{key}:", "", "```", value.rstrip(), "```"]
        elif isinstance(value, dict):
            lines += ["", f"{key}:", ""] + [f"- {k}: {_fmt(v)}" for k, v in value.items()]
        else:
            lines.append(f"- {key}: {_fmt(value)}")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, Stats):
        return value.text()
    if isinstance(value, dict) and {"median", "p10", "p90"} <= set(value):
        return Stats(**value).text()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_ratios(path: Path, comparisons: list[Comparison]) -> bool:
    """Bar chart of every ratio with its target; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return False
    rows = [c for c in comparisons if c.ratio is not None]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    colours = ["tab:green" if c.met else "tab:red" if c.met is False else "tab:grey" for c in rows]
    ax.barh([c.bench for c in rows], [c.ratio for c in rows], color=colours)
    for i, c in enumerate(rows):
        if c.target:
            ax.plot([float(c.target.split()[1])] * 2, [i - 0.4, i + 0.4], "k--")
    ax.set_xlabel("ratio ours / reference (dashed: target)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
