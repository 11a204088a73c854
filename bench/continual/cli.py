"""``python -m bench.continual`` / ``flava bench continual``: options to a BenchConfig."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench.continual as package
from bench.continual.benchmark import LOG_FORMAT, run_benchmark
from bench.continual.config import BenchConfig, full_config, quick_config
from bench.continual.sequences import SEQUENCES


def build_config(args: argparse.Namespace) -> BenchConfig:
    make: Callable[..., BenchConfig] = quick_config if args.mode == "quick" else full_config
    overrides: dict[str, Any] = {"workers": args.workers, "resume": args.resume}
    for name in ("methods", "seeds", "sequences"):
        if getattr(args, name):
            overrides[name] = tuple(getattr(args, name))
    if args.seeds:
        overrides["seeds_by_sequence"] = {}  # --seeds applies to every sequence
    if args.out:
        overrides["out_dir"] = args.out
    if args.start:
        overrides["start"] = args.start
    return make(**overrides)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("quick", "full"), default="quick")
    p.add_argument("--methods", nargs="+", help="default: the mode's methods")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the mode's, per sequence")
    p.add_argument("--sequences", nargs="+", choices=SEQUENCES)
    p.add_argument("--workers", type=int, default=2, help="processes in parallel")
    p.add_argument("--out", type=Path, help="report directory")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in OUT/runs")
    p.add_argument(
        "--start", type=Path, help="every seed starts from this flava pretrain file (exploratory)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.continual",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    cfg = build_config(args)
    report = run_benchmark(cfg)
    print((cfg.out_dir / "table.md").read_text())
    return 0 if report["sequences"] else 1
