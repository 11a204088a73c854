"""Rank groups (issue 16 §3): samples/s of 1 vs N ranks, and the scaling model for GPUs.

    python -m bench.perf_ranks                 # bench/results/ranks/{ranks.json, summary.md}
    python -m bench.perf_ranks --quick         # the test's sizes
    python -m bench.perf_ranks --device cuda --preset base --batch 9 --ranks 1,8   # gpu.sh

Measured: the learner as one rank of a group runs it (worker/core/distributed.py: gradients
all-reduced after the step's backward passes), at ``preset``, ``batch`` current clips per rank
(plus as many replayed), one torch thread per rank on a CPU (gloo) or one GPU per rank
(NCCL). Rounds alternate the group sizes, so load from other jobs hits each alike. Every
step starts at a barrier; a group's step time is its slowest rank's. samples/s = ranks x
batch / median step time; scaling = samples/s of N ranks / samples/s of 1 (1 rank: a plain
process, no all-reduce). The all-reduce's own time is measured inside each step.

Modelled (``scaling_model``): the GPU case at ``base``, from the all-reduce bytes per step
(counted on the learner), per-rank compute (two anchors: the paper's V100 throughput, and
the committed FLOPs per step at an assumed H100 utilisation), and stated NVLink figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.perfkit import Comparison, Stats, in_fresh_process, in_fresh_processes, machine_note

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "ranks"


@dataclass
class RanksConfig:
    device: str = "cpu"  # cpu: gloo, 1 torch thread per rank; cuda: NCCL, GPU r per rank
    preset: str = "tiny"
    method: str = "flava"
    batch: int = 4  # current clips per rank and step (as many replayed)
    ranks: tuple[int, ...] = (1, 2)
    warmup: int = 3  # steps before timing (the replay memory fills)
    steps: int = 12  # timed steps per round
    rounds: int = 3  # group sizes alternate round by round

    @classmethod
    def quick(cls) -> RanksConfig:
        return cls(warmup=1, steps=3, rounds=1)


@dataclass
class GroupResult:
    ranks: int
    step_s: list[float] = field(default_factory=list)  # slowest rank's wall time per step
    allreduce_s: list[float] = field(default_factory=list)  # rank 0's gradient all-reduce
    cpu_s: list[float] = field(default_factory=list)  # rank 0's CPU time per step

    def samples_per_s(self, batch: int) -> float:
        return self.ranks * batch / statistics.median(self.step_s)


# ---- one rank --------------------------------------------------------------------------
def rank_child(rank: int, world: int, rendezvous: str, cfg: RanksConfig) -> dict[str, list]:
    """Steps of one rank: {"step_s", "allreduce_s", "cpu_s": [per step]} (alone: no group)."""
    import torch
    import torch.distributed as dist

    from bench.perf import make_learner, random_batches

    torch.set_num_threads(1)
    device = f"cuda:{rank}" if cfg.device == "cuda" else "cpu"
    if world > 1:
        backend = "nccl" if cfg.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world)
    learner = make_learner(cfg.method, cfg.preset, 4 * cfg.batch)
    learner = _on_device(learner, device)
    timed = _TimedAllReduce() if world > 1 else None
    if timed is not None:
        learner.gradients = timed
    batches = random_batches(cfg.preset, cfg.batch, 4)
    out: dict[str, list] = {"step_s": [], "allreduce_s": [], "cpu_s": []}
    for i in range(cfg.warmup + cfg.steps):
        _barrier(world, device)
        start, cpu = time.perf_counter(), time.process_time()
        learner.step(batches[i % len(batches)])
        _sync(device)
        if i >= cfg.warmup:
            out["step_s"].append(time.perf_counter() - start)
            out["allreduce_s"].append(timed.last_s if timed is not None else 0.0)
            out["cpu_s"].append(time.process_time() - cpu)
    if world > 1:
        dist.destroy_process_group()
    return out


def _on_device(learner, device: str):
    if device == "cpu":
        return learner
    from worker.core.learner import build_learner

    return build_learner(learner.name, learner.model_cfg, learner.cfg, device=device)


def _barrier(world: int, device: str) -> None:
    import torch.distributed as dist

    if world > 1:
        dist.barrier(device_ids=[int(device.split(":")[1])] if device != "cpu" else None)


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize(device)


class _TimedAllReduce:
    """AllReduceGradients that keeps the time of its last call (the wait included: a
    rank that finished its backward first waits there for the slowest)."""

    def __init__(self) -> None:
        from worker.core.distributed import AllReduceGradients

        self.inner = AllReduceGradients()
        self.last_s = 0.0

    def average(self, params, contributes: bool, finite: bool) -> bool:
        start = time.perf_counter()
        done = self.inner.average(params, contributes, finite)
        self.last_s = time.perf_counter() - start
        return done


# ---- a group ---------------------------------------------------------------------------
def run_group(world: int, cfg: RanksConfig, workdir: Path) -> GroupResult:
    """One round: ``world`` ranks, each in a new process, stepping in lockstep."""
    rendezvous = f"file://{workdir / f'rdv-{world}-{time.monotonic_ns()}'}"
    if world == 1:
        results = [in_fresh_process(rank_child, 0, 1, rendezvous, cfg)]
    else:
        results = in_fresh_processes(
            rank_child, [(r, world, rendezvous, cfg) for r in range(world)]
        )
    steps = [max(per_rank) for per_rank in zip(*(r["step_s"] for r in results), strict=True)]
    return GroupResult(world, steps, results[0]["allreduce_s"], results[0]["cpu_s"])


def measure(cfg: RanksConfig) -> dict[int, GroupResult]:
    groups = {n: GroupResult(n) for n in cfg.ranks}
    with tempfile.TemporaryDirectory(prefix="flava-ranks-") as tmp:
        for round_ in range(cfg.rounds):
            for n in cfg.ranks if round_ % 2 == 0 else reversed(cfg.ranks):
                got = run_group(n, cfg, Path(tmp))
                groups[n].step_s += got.step_s
                groups[n].allreduce_s += got.allreduce_s
                groups[n].cpu_s += got.cpu_s
                log.info("round %d, %d ranks: median step %.3f s", round_, n, _median(got.step_s))
    return groups


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_ranks(quick: bool) -> list[Comparison]:
    """For bench/perf.py (``--only ranks``): samples/s of 2 ranks against 1, per step."""
    cfg = RanksConfig.quick() if quick else RanksConfig()
    groups = measure(cfg)
    rates = {n: [n * cfg.batch / s for s in g.step_s] for n, g in groups.items()}
    setup = f"{cfg.method}, {cfg.preset}, batch {cfg.batch} per rank, 1 thread per rank"
    return [
        Comparison(
            "ranks",
            f"samples/s of a 2-rank group (gloo) against 1 rank ({setup})",
            "2 ranks",
            Stats.of(rates[2], "samples/s"),
            "1 rank",
            Stats.of(rates[1], "samples/s"),
            notes=["the GPU scaling model: python -m bench.perf_ranks (docs/distributed.md)"],
        )
    ]


# ---- the GPU model ---------------------------------------------------------------------
@dataclass(frozen=True)
class GpuAssumptions:
    """What the model takes as given; each figure with where it comes from."""

    gpus: int = 8
    # NCCL all-reduce bus bandwidth of 8 H100 SXM on NVLink4/NVSwitch for messages of
    # hundreds of MB: nccl-tests report ~450-480 GB/s; 350 leaves room for a busy node
    busbw_gb_s: float = 350.0
    hbm_gb_s: float = 3350.0  # H100 SXM HBM3: the buffer's pack and unpack are copies
    vote_s: float = 50e-6  # the per-iteration vote: one 5-integer all-reduce (latency-bound)
    # per-rank compute, anchor 1: the paper's V100, STELLA at base, batch 9: 17.29 samples/s
    v100_samples_per_s: float = 17.29
    # anchor 2: committed FLOPs per step (bench/results/perf.md: flava, base, batch 2:
    # 1493.6 GFLOP, matmuls only; linear in the batch) at this share of the H100's bf16
    # dense peak (989 TFLOP/s): a fast GPU is the worst case for the all-reduce's share
    gflop_per_step_batch2: float = 1493.6
    h100_peak_tflops: float = 989.0
    h100_utilisation: float = 0.35
    decode_ms_per_clip: float = 43.6  # bench/results/perf.md: a base clip, one CPU thread


def trainable_parameters(method: str, preset_name: str) -> tuple[int, int]:
    """(parameters, tensors) the all-reduce carries, counted on the learner itself."""
    from bench.perf import make_learner

    learner = make_learner(method, preset_name, 1)
    params = [p for g in learner.optimizer.param_groups for p in g["params"]]
    return sum(p.numel() for p in params), len(params)


def scaling_model(method: str, batch: int, a: GpuAssumptions) -> dict[str, Any]:
    """Expected efficiency of ``a.gpus`` ranks at ``base``: compute / (compute + comm)."""
    numel, tensors = in_fresh_process(trainable_parameters, method, "base")
    buffer_bytes = 4 * (numel + tensors + 2)  # fp32 gradients, has-gradient flags, 2 flags
    wire_bytes = 2 * (a.gpus - 1) / a.gpus * buffer_bytes  # ring all-reduce, per GPU
    allreduce_s = wire_bytes / (a.busbw_gb_s * 1e9)
    copies_s = 4 * buffer_bytes / (a.hbm_gb_s * 1e9)  # pack (read + write), unpack (same)
    comm_s = allreduce_s + copies_s + a.vote_s
    flops = a.gflop_per_step_batch2 * 1e9 * batch / 2
    anchors = {
        "v100_paper": batch / a.v100_samples_per_s,
        "h100_flops": flops / (a.h100_peak_tflops * 1e12 * a.h100_utilisation),
    }
    rows = {}
    for name, compute_s in anchors.items():
        efficiency = compute_s / (compute_s + comm_s)
        clips_per_s = a.gpus * batch / (compute_s + comm_s)
        rows[name] = {
            "compute_s_per_step": compute_s,
            "efficiency": efficiency,
            "samples_per_s": clips_per_s,
            "decode_cores_needed": clips_per_s * a.decode_ms_per_clip / 1000,
        }
    return {
        "method": method,
        "preset": "base",
        "batch_per_rank": batch,
        "parameters": numel,
        "tensors": tensors,
        "allreduce_buffer_bytes": buffer_bytes,
        "allreduce_wire_bytes_per_gpu": wire_bytes,
        "allreduce_s": allreduce_s,
        "pack_unpack_s": copies_s,
        "comm_s_per_step": comm_s,
        "anchors": rows,
        "assumptions": asdict(a),
    }


# ---- report ----------------------------------------------------------------------------
def report(cfg: RanksConfig, groups: dict[int, GroupResult], model: dict | None) -> dict:
    base = groups[min(cfg.ranks)].samples_per_s(cfg.batch)
    measured = {
        str(n): {
            "samples_per_s": g.samples_per_s(cfg.batch),
            "scaling": g.samples_per_s(cfg.batch) / base,
            "step_s_median": _median(g.step_s),
            "step_s_p10_p90": _spread(g.step_s),
            "allreduce_s_median": _median(g.allreduce_s),
            "cpu_s_median": _median(g.cpu_s),
            "steps": len(g.step_s),
        }
        for n, g in groups.items()
    }
    return {"config": asdict(cfg), "machine": machine_note(), "measured": measured, "model": model}


def _spread(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [ordered[len(ordered) // 10], ordered[(9 * len(ordered)) // 10]]


def summary_markdown(result: dict, command: str) -> str:
    cfg, lines = result["config"], []
    lines += [
        "# Rank groups: samples/s of 1 vs N ranks, and the GPU scaling model",
        "",
        f"Produced by `{command}`; {result['machine']} (shared with other work).",
        f"Measured: {cfg['method']} at `{cfg['preset']}`, batch {cfg['batch']} per rank "
        f"(+{cfg['batch']} replayed), device {cfg['device']}, one torch thread per rank on a CPU, "
        f"{cfg['rounds']} rounds x {cfg['steps']} timed steps per group size, alternating.",
        "",
        "| ranks | samples/s | scaling vs 1 rank | step median [p10-p90] | all-reduce median "
        "| CPU time per step (rank 0) |",
        "|---|---|---|---|---|---|",
    ]
    for n, m in result["measured"].items():
        p10, p90 = m["step_s_p10_p90"]
        lines.append(
            f"| {n} | {m['samples_per_s']:.2f} | {m['scaling']:.2f}x | "
            f"{m['step_s_median'] * 1e3:.0f} [{p10 * 1e3:.0f}-{p90 * 1e3:.0f}] ms | "
            f"{m['allreduce_s_median'] * 1e3:.1f} ms | {m['cpu_s_median'] * 1e3:.0f} ms |"
        )
    if result["model"] is not None:
        lines += ["", *_model_lines(result["model"])]
    return "\n".join(lines) + "\n"


def _model_lines(m: dict) -> list[str]:
    a = m["assumptions"]
    lines = [
        f"## Model: {a['gpus']} GPUs on NVLink, {m['method']} at `base`, batch "
        f"{m['batch_per_rank']} per rank",
        "",
        f"- all-reduce per step: {m['parameters'] / 1e6:.1f} M parameters in {m['tensors']} "
        f"tensors -> one fp32 buffer of {m['allreduce_buffer_bytes'] / 1e6:.0f} MB; a ring "
        f"sends {m['allreduce_wire_bytes_per_gpu'] / 1e6:.0f} MB per GPU: "
        f"{m['allreduce_s'] * 1e3:.2f} ms at {a['busbw_gb_s']:.0f} GB/s bus bandwidth, "
        f"+ {m['pack_unpack_s'] * 1e3:.2f} ms packing, + the vote: "
        f"{m['comm_s_per_step'] * 1e3:.2f} ms per step, not overlapped with the backward.",
        "",
        "| per-rank compute anchor | compute per step | efficiency | samples/s (all GPUs) "
        "| decode cores needed |",
        "|---|---|---|---|---|",
    ]
    names = {
        "v100_paper": f"paper's V100 ({a['v100_samples_per_s']} samples/s)",
        "h100_flops": f"H100 at {a['h100_utilisation']:.0%} of bf16 peak (matmul FLOPs)",
    }
    for key, row in m["anchors"].items():
        lines.append(
            f"| {names[key]} | {row['compute_s_per_step'] * 1e3:.0f} ms | "
            f"{row['efficiency']:.1%} | {row['samples_per_s']:.0f} | "
            f"{row['decode_cores_needed']:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--method", default="flava")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ranks", default="1,2", help="group sizes, e.g. 1,8")
    p.add_argument("--steps", type=int, help="timed steps per round")
    p.add_argument("--rounds", type=int, help="rounds per group size")
    p.add_argument("--no-model", action="store_true", help="skip the GPU scaling model")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = RanksConfig.quick() if args.quick else RanksConfig()
    cfg.device, cfg.preset, cfg.method, cfg.batch = (
        args.device,
        args.preset,
        args.method,
        args.batch,
    )
    cfg.ranks = tuple(int(n) for n in args.ranks.split(","))
    cfg.steps, cfg.rounds = args.steps or cfg.steps, args.rounds or cfg.rounds
    model = None if args.no_model else scaling_model(cfg.method, 9, GpuAssumptions())
    result = report(cfg, measure(cfg), model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ranks.json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python -m bench.perf_ranks " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "summary.md").write_text(summary_markdown(result, command.strip()))
    log.info("written %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
