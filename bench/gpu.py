"""Learner efficiency on one accelerator: samples/s and peak memory of finetune, er and flava.

The paper's efficiency table (one V100, batch 9, base preset): ER 17.70 samples/s at
30.95 GB, STELLA 17.29 samples/s at 17.45 GB, Finetune 29.46 samples/s at 18.34 GB.

    python -m bench.gpu --device cuda --preset base --batch 9      # what bench/gpu.sh runs
    python -m bench.gpu --device cpu --preset tiny --batch 2       # checks the script on a CPU
    python -m bench.gpu --methods '' --out /tmp/embed                # the embedding figure only

Each method in turn, in one process: build the learner (bf16 autocast on CUDA, the paper's
Adam), ``--warmup`` steps (the replay memory fills; FLAVA selects from the first step, as it
does with a pretrained AVM), reset the peak-memory counter, ``--steps`` timed steps. Samples/s
counts the current clips of a step (``--batch``), as the paper does; peak memory is
torch.cuda.max_memory_allocated (tensors; the caching allocator reserves more, reported too).
Inputs are random normalised tensors: step cost does not depend on content.

Then the embedding model at batch 1 vs 16 (issue 15 §1's dynamic-batching figure, where it
matters: on one CPU thread a call of 1 already keeps the core busy, bench/embed_batching.py):
16 pre-decoded clips on the CPU embedded as the embedder does it (stack, copy to the device,
``AVMAE.embed`` under inference mode and bf16 autocast, float32 back on the CPU) in calls of 1
and in one call of 16, ``--embed-rounds`` rounds alternating the sides; samples/s of each and
their ratio go to the JSON's ``embed_batching``. ``--embed-rounds 0`` leaves it out.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import embed_batching
from worker.core.learner import Batch, Learner, LearnerConfig, build_learner
from worker.core.model import preset

log = logging.getLogger(__name__)
PAPER = {  # one V100, batch 9: (samples/s, GB)
    "finetune": (29.46, 18.34),
    "er": (17.70, 30.95),
    "flava": (17.29, 17.45),
}


@dataclass
class GpuConfig:
    device: str = "cuda"
    preset: str = "base"
    batch: int = 9
    warmup: int = 5
    steps: int = 20
    memory_size: int = 2000  # replay clips, kept on the CPU (as the authors do)
    methods: tuple[str, ...] = ("finetune", "er", "flava")
    embed_batches: tuple[int, ...] = (1, 16)  # embedding model call sizes compared
    embed_rounds: int = 20  # rounds of the embedding comparison (0: none)


@dataclass
class MethodResult:
    method: str
    samples_per_s: float  # current clips per second, from the median step time
    step_ms_median: float
    step_ms_p10: float
    step_ms_p90: float
    peak_allocated_gb: float  # max_memory_allocated over the timed steps (0 on CPU)
    peak_reserved_gb: float
    paper_samples_per_s: float
    paper_gb: float


def make_learner(method: str, cfg: GpuConfig) -> Learner:
    options = {"warmup_acc": 0.0, "pre_update_embeddings": False}
    learner_cfg = LearnerConfig(seed=0, memory_size=cfg.memory_size, amp=True)
    learner_cfg.options = options if method.startswith("flava") else {}
    return build_learner(method, preset(cfg.preset), learner_cfg, device=cfg.device)


def random_batches(cfg: GpuConfig, count: int) -> list[Batch]:
    c, g = preset(cfg.preset), torch.Generator().manual_seed(0)
    shape_v = (cfg.batch, c.num_frames, 3, c.frame_size, c.frame_size)
    pin = cfg.device.startswith("cuda")
    batches = []
    for _ in range(count):
        fbank = torch.randn(cfg.batch, c.audio_frames, c.mel_bins, generator=g)
        frames = torch.randn(shape_v, generator=g)
        batches.append(
            Batch(fbank.pin_memory() if pin else fbank, frames.pin_memory() if pin else frames)
        )
    return batches


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_method(method: str, cfg: GpuConfig, batches: list[Batch]) -> MethodResult:
    learner = make_learner(method, cfg)
    for i in range(cfg.warmup):
        learner.step(batches[i % len(batches)])
    cuda = cfg.device.startswith("cuda")
    if cuda:
        synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for i in range(cfg.steps):
        started = time.perf_counter()
        learner.step(batches[i % len(batches)])
        synchronize(cfg.device)
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved() / 1e9 if cuda else 0.0
    return _result(method, cfg, seconds, peak, reserved)


def _result(method: str, cfg: GpuConfig, seconds: list[float], peak: float, reserved: float):
    ms = sorted(1000 * s for s in seconds)
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    median = statistics.median(ms)
    paper = PAPER.get(method, (float("nan"), float("nan")))
    return MethodResult(
        method, cfg.batch / (median / 1000), median, q[0], q[-1], peak, reserved, *paper
    )


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run(cfg: GpuConfig) -> list[MethodResult]:
    batches = random_batches(cfg, 4)
    results = []
    for method in cfg.methods:
        log.info("%s: %d warm-up + %d timed steps", method, cfg.warmup, cfg.steps)
        results.append(run_method(method, cfg, batches))
        release(cfg.device)
        log.info("%s", results[-1])
    return results


def embed_batching_result(cfg: GpuConfig) -> dict:
    """Samples/s of the embedding model in calls of each of ``cfg.embed_batches`` clips.

    On CUDA also in float32 (``fp32``), as worker/embedder.py's ``embed_clips`` runs today
    (the learner embeds under bf16 autocast): the gain a bf16 embedder would bring.
    """
    model = embed_batching.build_model(cfg.preset, cfg.device)
    clips = embed_batching.random_clips(cfg.preset, max(cfg.embed_batches))
    result = _embed_sides(cfg, model, clips, amp=True)
    result.update(preset=cfg.preset, bf16_autocast=cfg.device.startswith("cuda"))
    if cfg.device.startswith("cuda"):
        result["fp32"] = _embed_sides(cfg, model, clips, amp=False)
    del model
    release(cfg.device)
    return result


def _embed_sides(cfg: GpuConfig, model, clips, amp: bool) -> dict:
    sides = embed_batching.time_sides(
        model, clips, cfg.embed_batches, cfg.embed_rounds, cfg.device, amp
    )
    return {
        "clips": len(clips),
        "rounds": cfg.embed_rounds,
        "samples_per_s": {str(s.batch): s.clips_per_s for s in sides},
        "ratio": embed_batching.speedup(sides),
        "sides": [asdict(s) for s in sides],
    }


def embed_markdown(result: dict) -> list[str]:
    rates = ", ".join(f"batch {b}: {v:.1f}" for b, v in result["samples_per_s"].items())
    return [
        "",
        f"Embedding model ({result['preset']}, bf16 autocast {result['bf16_autocast']}, "
        f"{result['clips']} pre-decoded clips, median of {result['rounds']} rounds), "
        f"samples/s {rates}; ratio {result['ratio']:.2f}x (issue 15 §1 target >= 2x).",
    ] + _fp32_line(result.get("fp32"))


def _fp32_line(fp32: dict | None) -> list[str]:
    if fp32 is None:
        return []
    rates = ", ".join(f"batch {b}: {v:.1f}" for b, v in fp32["samples_per_s"].items())
    return [
        f"The same in float32 (the embedder today): samples/s {rates}; ratio {fp32['ratio']:.2f}x."
    ]


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return device


def markdown(results: list[MethodResult], cfg: GpuConfig) -> str:
    lines = [
        f"# Learner efficiency on {device_name(cfg.device)}",
        "",
        f"`python -m bench.gpu` config: `{json.dumps(asdict(cfg))}`; torch {torch.__version__}.",
        "",
        "| method | samples/s | step ms median [p10-p90] | peak allocated GB | reserved GB "
        "| paper (V100) samples/s | paper GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.samples_per_s:.2f} | {r.step_ms_median:.1f} "
            f"[{r.step_ms_p10:.1f}-{r.step_ms_p90:.1f}] | {r.peak_allocated_gb:.2f} "
            f"| {r.peak_reserved_gb:.2f} | {r.paper_samples_per_s} | {r.paper_gb} |"
        )
    by = {r.method: r for r in results}
    if {"flava", "er"} <= set(by) and by["er"].peak_allocated_gb:
        mem = by["flava"].peak_allocated_gb / by["er"].peak_allocated_gb
        time_ratio = by["flava"].step_ms_median / by["er"].step_ms_median
        lines += [
            "",
            f"flava / er: peak memory {mem:.2f} (paper 0.56), step time "
            f"{time_ratio:.2f} (paper 1.02).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=9)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--memory-size", type=int, default=2000)
    p.add_argument("--methods", default="finetune,er,flava")
    p.add_argument("--embed-batches", default="1,16", help="embedding call sizes compared")
    p.add_argument("--embed-rounds", type=int, default=20, help="0: no embedding comparison")
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log.error(
            "no CUDA device: run with --device cpu (and a small --preset) to check the script"
        )
        return 2
    cfg = GpuConfig(
        args.device,
        args.preset,
        args.batch,
        args.warmup,
        args.steps,
        args.memory_size,
        tuple(m for m in args.methods.split(",") if m),  # "": the embedding comparison only
        tuple(int(b) for b in args.embed_batches.split(",")),
        args.embed_rounds,
    )
    results = run(cfg)
    text = markdown(results, cfg)
    embedding = embed_batching_result(cfg) if cfg.embed_rounds > 0 else None
    if embedding is not None:
        text += "\n".join(embed_markdown(embedding)) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "config": asdict(cfg),
            "device": device_name(cfg.device),
            "torch": torch.__version__,
        }
        body["results"] = [asdict(r) for r in results]
        if embedding is not None:
            body["embed_batching"] = embedding
        args.out.with_suffix(".json").write_text(json.dumps(body, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
