"""The embedding model at batch 1 vs 16 on pre-decoded inputs: throughput and where time goes.

Issue 15 §1 asks dynamic batching for >= 2x model throughput at concurrency 16; on the 2-core
CPU at `tiny` bench/perf_query.py measured 1.01x. This explains the figure. For each preset it
times the embedder's model call (worker/embedder.py ``embed_clips``: stack the decoded clips,
move them to the device, ``AVMAE.embed`` under inference mode, float32 embeddings back on the
CPU) on 16 clips embedded in 16 calls of 1 and in one call of 16, the two sides alternating
each round so load drifts hit both alike; torch on ``--threads`` threads (1, the embedder's
default). A torch.profiler pass per side then says which ops the time goes to, per clip, and
the FLOP rate of the matrix products. Weights and inputs are random: cost does not depend on
content. Imports only torch and the learning core, so bench/gpu.py runs the same timing on a
GPU (bf16 autocast there).

    python -m bench.embed_batching                 # tiny and base, CPU, 1 thread
    python -m bench.embed_batching --presets tiny --rounds 3 --passes 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from worker.core.model import AVMAE, preset

log = logging.getLogger(__name__)
RESULT = Path("bench/results/embed_batching")
CLIPS = 16  # waiting requests: the concurrency
Clip = tuple[torch.Tensor, torch.Tensor]  # fbank (Ta, F), frames (T, 3, S, S), as decoded
MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")


@dataclass
class Side:
    """One way of embedding the clips: calls of ``batch`` clips each."""

    batch: int
    ms_per_clip: float  # median over rounds
    ms_per_clip_p10: float
    ms_per_clip_p90: float
    clips_per_s: float  # from the median
    cpu_ms_per_clip: float  # median process CPU time: steadier than wall time on a busy host


@dataclass
class OpTime:
    op: str
    ms_per_clip: float  # self CPU time of the op, summed over its calls, per clip
    share: float  # of all ops' self time
    calls_per_clip: float


@dataclass
class Profile:
    batch: int
    ops_ms_per_clip: float  # self CPU time of every op, per clip
    op_calls_per_clip: float  # aten ops dispatched per clip: the per-call overhead's size
    matmul_share: float  # of the ops' self time
    matmul_gflop_per_clip: float  # FLOPs of the matrix products, per clip
    matmul_gflops: float  # their FLOP rate (FLOPs / their self time)
    top: list[OpTime]  # torch.profiler's self time (wall time: it counts a descheduled thread)
    cpu_ms_by_module: dict[str, float]  # self CPU time per module kind, per clip (hooks)


def build_model(name: str, device: str) -> AVMAE:
    torch.manual_seed(0)
    return AVMAE(preset(name)).to(device).eval()


def random_clips(name: str, count: int = CLIPS) -> list[Clip]:
    """``count`` pre-decoded clips of the preset's shapes, on the CPU as decode leaves them."""
    c, g = preset(name), torch.Generator().manual_seed(0)
    shape_v = (c.num_frames, 3, c.frame_size, c.frame_size)
    return [
        (torch.randn(c.audio_frames, c.mel_bins, generator=g), torch.randn(shape_v, generator=g))
        for _ in range(count)
    ]


def autocast(device: str, amp: bool):
    """bf16 autocast on CUDA when ``amp`` (as the learner runs there); a no-op elsewhere."""
    if amp and device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def embed_call(model: AVMAE, clips: Sequence[Clip], device: str, amp: bool) -> torch.Tensor:
    """One model call as the embedder makes it -> (B, 2, D) float32 on the CPU."""
    fbank = torch.stack([a for a, _ in clips]).to(device)
    frames = torch.stack([v for _, v in clips]).to(device)
    with torch.inference_mode(), autocast(device, amp):
        emb_a, emb_v = model.embed(fbank, frames)
    return torch.stack([emb_a, emb_v], dim=1).float().cpu()  # .cpu() waits for the device


def embed_in_calls(model: AVMAE, clips: list[Clip], batch: int, device: str, amp: bool) -> None:
    for start in range(0, len(clips), batch):
        embed_call(model, clips[start : start + batch], device, amp)


def time_sides(
    model: AVMAE,
    clips: list[Clip],
    batches: Sequence[int],
    rounds: int,
    device: str = "cpu",
    amp: bool = False,
) -> list[Side]:
    """Every round embeds all clips once per batch size, the sides in turn; per-clip ms."""
    for batch in batches:  # warm up (allocator, kernels) with one call of each size
        embed_call(model, clips[:batch], device, amp)
    wall: dict[int, list[float]] = {b: [] for b in batches}
    cpu: dict[int, list[float]] = {b: [] for b in batches}
    for r in range(rounds):
        for batch in batches if r % 2 == 0 else list(reversed(batches)):
            started, started_cpu = time.perf_counter(), time.process_time()
            embed_in_calls(model, clips, batch, device, amp)
            wall[batch].append(1000 * (time.perf_counter() - started) / len(clips))
            cpu[batch].append(1000 * (time.process_time() - started_cpu) / len(clips))
    return [_side(b, wall[b], cpu[b]) for b in batches]


def _side(batch: int, ms: list[float], cpu_ms: list[float]) -> Side:
    median = statistics.median(ms)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    p10, p90, cpu = round(q[0], 3), round(q[-1], 3), round(statistics.median(cpu_ms), 3)
    return Side(batch, round(median, 3), p10, p90, round(1000 / median, 2), cpu)


def speedup(sides: Sequence[Side]) -> float:
    """Clips/s of the largest batch over clips/s of batch 1 (the batching gain)."""
    by = {s.batch: s for s in sides}
    return round(by[max(by)].clips_per_s / by[min(by)].clips_per_s, 3)


@dataclass
class OpStat:
    self_us: float  # self CPU time over one pass (median of the passes)
    count: int  # calls in one pass
    flops: float  # counted for matrix products only


def op_stats(model: AVMAE, clips: list[Clip], batch: int, passes: int) -> dict[str, OpStat]:
    """aten ops of ``passes`` profiled passes over the clips in calls of ``batch``.

    The profiler's self time is wall time, so on a busy host a pass may include time the
    thread was descheduled: the median over passes, per op, is what is kept.
    """
    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first-use costs
        embed_call(model, clips[:1], "cpu", amp=False)
    runs = []
    for _ in range(passes):
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            embed_in_calls(model, clips, batch, "cpu", amp=False)
        runs.append({e.key: e for e in prof.key_averages() if e.key.startswith("aten::")})
    return {
        key: OpStat(
            statistics.median(r[key].self_cpu_time_total if key in r else 0.0 for r in runs),
            event.count,
            event.flops,
        )
        for key, event in runs[0].items()
    }


def profile_side(
    model: AVMAE, clips: list[Clip], batch: int, passes: int = 1, top: int = 8
) -> Profile:
    """Where the time of calls of ``batch`` goes: self CPU time per aten op, per clip."""
    stats, n = op_stats(model, clips, batch, passes), len(clips)
    total_us = sum(s.self_us for s in stats.values())
    mm = [s for key, s in stats.items() if key in MATMULS]
    mm_us, mm_flops = sum(s.self_us for s in mm), sum(s.flops for s in mm)
    ranked = sorted(stats.items(), key=lambda kv: kv[1].self_us, reverse=True)
    return Profile(
        batch=batch,
        ops_ms_per_clip=round(total_us / 1000 / n, 3),
        op_calls_per_clip=round(sum(s.count for s in stats.values()) / n, 1),
        matmul_share=round(mm_us / total_us, 3),
        matmul_gflop_per_clip=round(mm_flops / 1e9 / n, 3),
        matmul_gflops=round(mm_flops / mm_us / 1000, 1) if mm_us else 0.0,
        top=[_op(key, s, total_us, n) for key, s in ranked[:top]],
        cpu_ms_by_module=module_cpu_ms(model, clips, batch),
    )


def _op(key: str, s: OpStat, total_us: float, clips: int) -> OpTime:
    return OpTime(
        key,
        round(s.self_us / 1000 / clips, 3),
        round(s.self_us / total_us, 3),
        round(s.count / clips, 2),
    )


def module_cpu_ms(model: AVMAE, clips: list[Clip], batch: int) -> dict[str, float]:
    """Self CPU time (thread time) per module kind, ms per clip, over one pass.

    Forward hooks time each module call; a module's self time leaves out its children's.
    "outside modules" is the rest of the call: stacking and moving the inputs, patchify,
    positions, the token means, the copy back. CPU time, unlike wall time, does not count
    the time another process held the core, so the split holds on a busy host.
    """
    totals: dict[str, float] = defaultdict(float)
    stack: list[list[float]] = []  # per open call: [started, its children's time]

    def pre(module, args) -> None:
        stack.append([time.thread_time(), 0.0])

    def post(module, args, out) -> None:
        started, children = stack.pop()
        spent = time.thread_time() - started
        totals[type(module).__name__] += spent - children
        if stack:
            stack[-1][1] += spent
        else:
            totals["(modules)"] += spent

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        started = time.thread_time()
        embed_in_calls(model, clips, batch, "cpu", amp=False)
        totals["outside modules"] = time.thread_time() - started - totals.pop("(modules)")
    finally:
        for h in handles:
            h.remove()
    ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
    return {kind: round(1000 * t / len(clips), 3) for kind, t in ranked}


def gemm_gflops(rows: int = 4096, dim: int = 768, repeats: int = 5) -> float:
    """This host's large-GEMM rate in CPU time: (rows, dim) @ (dim, 4 dim), best of ``repeats``.

    The ceiling a batched call can approach (one thread: CPU time is the thread's work).
    """
    a, b = torch.randn(rows, dim), torch.randn(dim, 4 * dim)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return round(2 * rows * dim * 4 * dim / best / 1e9, 1)


def _seconds(fn) -> float:
    started = time.thread_time()
    fn()
    return time.thread_time() - started


def run_preset(name: str, rounds: int, passes: int) -> dict:
    model, clips = build_model(name, "cpu"), random_clips(name)
    sides = time_sides(model, clips, (1, CLIPS), rounds)
    log.info("%s: %s", name, sides)
    result: dict = {"preset": name, "sides": [asdict(s) for s in sides], "speedup": speedup(sides)}
    if passes:
        result["profiles"] = [asdict(profile_side(model, clips, b, passes)) for b in (1, CLIPS)]
    return result


def markdown(body: dict) -> str:
    lines = [
        "# Embedding model, batch 1 vs 16, pre-decoded inputs",
        "",
        f"`{body['command']}`; {body['machine']}, torch {body['torch']} on "
        f"{body['threads']} thread(s), load average {body['load_before']} before / "
        f"{body['load_after']} after; a large GEMM ((4096, 768) @ (768, 3072), best of 5) runs "
        f"at {body['gemm_gflops']:.0f} GFLOP/s of CPU time here.",
        "",
        "Wall time counts the time other processes held the core; CPU time (the process's) "
        "does not, so on a busy host its ratio is the steadier figure of the batching gain.",
        "",
        "| preset | wall ms/clip at 1 [p10-p90] | at 16 [p10-p90] | clips/s 1 -> 16 | wall gain "
        "| CPU ms/clip 1 / 16 | CPU gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in body["presets"]:
        one, many = p["sides"]
        lines.append(
            f"| {p['preset']} | {one['ms_per_clip']:.1f} [{one['ms_per_clip_p10']:.1f}-"
            f"{one['ms_per_clip_p90']:.1f}] | {many['ms_per_clip']:.1f} "
            f"[{many['ms_per_clip_p10']:.1f}-{many['ms_per_clip_p90']:.1f}] | "
            f"{one['clips_per_s']:.1f} -> {many['clips_per_s']:.1f} | {p['speedup']:.2f}x "
            f"| {one['cpu_ms_per_clip']:.1f} / {many['cpu_ms_per_clip']:.1f} "
            f"| {one['cpu_ms_per_clip'] / many['cpu_ms_per_clip']:.2f}x |"
        )
    for p in body["presets"]:
        lines += _profile_lines(p)
    return "\n".join(lines) + "\n"


def _profile_lines(p: dict) -> list[str]:
    lines = []
    for prof in p.get("profiles", []):
        lines += [
            "",
            f"## {p['preset']}, calls of {prof['batch']}",
            "",
            f"ops {prof['ops_ms_per_clip']:.2f} ms/clip, {prof['op_calls_per_clip']:.0f} aten "
            f"ops/clip; matrix products {prof['matmul_gflop_per_clip']:.2f} GFLOP/clip, "
            f"{100 * prof['matmul_share']:.0f}% of the time, at "
            f"{prof['matmul_gflops']:.0f} GFLOP/s",
            "",
            "torch.profiler's self time per aten op (wall time: it includes descheduled time; "
            "the median of the profiled passes):",
            "",
            "| op | ms/clip | share | calls/clip |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {o['op']} | {o['ms_per_clip']:.3f} | {100 * o['share']:.1f}% "
            f"| {o['calls_per_clip']:g} |"
            for o in prof["top"]
        ]
        by_module = ", ".join(f"{k} {v:.2f}" for k, v in prof["cpu_ms_by_module"].items())
        lines += [
            "",
            f"Self CPU ms/clip by module kind (forward hooks, thread CPU time): {by_module}",
        ]
    return lines


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,base")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", type=int, default=3, help="profiled passes per side (0: none)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"<out>.json and <out>.md (default: {RESULT}/<presets>)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    body: dict = {
        "command": " ".join(
            ["python -m bench.embed_batching", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": f"{os.cpu_count()} cores, CPU",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_before": load_average(),
        "gemm_gflops": gemm_gflops(),
    }
    body["presets"] = [
        run_preset(name, args.rounds, args.passes) for name in args.presets.split(",")
    ]
    body["load_after"] = load_average()
    out = args.out or RESULT / args.presets.replace(",", "-")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(body, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(body))
    print(markdown(body))  # noqa: T201 - a benchmark's report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
