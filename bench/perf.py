"""Performance benchmarks, each measured side by side with its reference in the same run.

    python -m bench.perf            # full run: bench/results/perf.{md,json,png}
    python -m bench.perf --quick    # minimal sizes, under two minutes (the test runs this)

1. decode   bytes -> Clip for a 10 s 224x224 25 fps H.264+AAC clip (base media config: 1024
            fbank frames, 4 frames at 224), in a decode process as the worker runs it, against
            ``ffmpeg -v error -i f.mp4 -f null -`` (a full decode of both streams).
2. step     flava vs er vs finetune at one preset and batch: step time (round robin in one
            process, so load drifts hit every method alike) and peak memory (each method in
            its own process: the profiler's memory timeline, and the peak-RSS growth).
2b. checkpoint  one checkpoint interval with its checkpoint vs without (overhead), and a
            restart's restore + replay of that interval vs the interval (bench/perf_checkpoint.py).
2c. windows one window of a 1-hour 720p upload, decode_clip vs the ffmpeg CLI on the same span
            (bench/perf_windows.py; not in the default --only: its upload takes minutes to make
            the first time; its own report: python -m bench.perf_windows).
2d. upload  a 10-minute 720p upload through the running service: time to its first window's
            embedding vs to every window learned (bench/perf_upload.py; not in the default
            --only, for the same reason; its own report: python -m bench.perf_upload).
3. service  clips/s from POST /ingest to embedding written (real API, worker and redis-server
            processes) against the learner's own steps on the same clips, pre-decoded.
4. ingest   POST /ingest of 1 MB clips at concurrency 8 against redis-py running the same
            ingest script (contract.wire.INGEST_SCRIPT) on the same payloads.
5. embed    GET /embed at concurrency 8 against redis-py reading the same two hashes.
6. ranks    samples/s of a 2-rank group against 1 rank (bench/perf_ranks.py, which also writes
            the GPU scaling model; not in the default --only).

Timings on a shared machine are noisy: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.perf_checkpoint import bench_checkpoint
from bench.perf_ranks import bench_ranks
from bench.perf_upload import bench_upload
from bench.perf_windows import WindowsConfig, bench_windows
from bench.perfkit import (
    Comparison,
    Stats,
    in_fresh_process,
    in_fresh_processes,
    machine_note,
    markdown,
    peak_rss_bytes,
    plot_ratios,
    reset_peak_rss,
    rss_bytes,
    write_json,
)
from flava.procs import idle_openmp_threads_sleep

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"
METHODS = ("flava", "er", "finetune")
MEMORY_CATEGORIES = (  # column order of torch.profiler's raw memory timeline
    "parameter",
    "optimizer_state",
    "input",
    "temporary",
    "activation",
    "gradient",
    "autograd_detail",
    "unknown",
)


@dataclass
class PerfConfig:
    """Sizes of every benchmark; ``quick()`` shrinks them for the test."""

    quick: bool = False
    decode_reps: int = 30  # decodes of the clip, each side
    decode_seconds: float = 10.0  # clip length
    step_preset: str = "tiny"
    step_batch: int = 8
    step_warmup: int = 3  # steps before timing (the replay memory fills, selection is on)
    step_reps: int = 12  # timed steps per method
    flops_base: bool = True  # also count FLOPs of one base-preset step (batch 2; ~3 min CPU)
    service: dict[str, Any] = field(default_factory=dict)  # ServiceConfig overrides
    profile: bool = False  # py-spy the worker and the API while they are measured
    # checkpoint overhead at the worker's default interval and batch (bench/perf_checkpoint.py)
    checkpoint: dict[str, Any] = field(
        default_factory=lambda: {"presets": ("tiny", "small"), "blocks": 4}
    )
    # decode time per window of a long upload vs the ffmpeg CLI (bench/perf_windows.py)
    windows: dict[str, Any] = field(default_factory=dict)  # WindowsConfig overrides

    @classmethod
    def quick_config(cls) -> PerfConfig:
        service = {
            "clips": 8,
            "warmup_clips": 4,
            "batch_size": 4,
            "ingest_requests": 8,
            "ingest_rounds": 2,
            "embed_requests": 16,
            "embed_rounds": 2,
            "real_payload": False,
        }
        checkpoint = {"presets": ("tiny",), "blocks": 2, "every": 3, "batch": 2}
        windows = {"minutes": 0.5, "windows": 4, "reps": 1, "position_reps": 1}
        return cls(True, 3, 2.0, "tiny", 2, 1, 2, False, service, False, checkpoint, windows)


# ---------------------------------------------------------------------------------------
# 1. decode


def make_decode_clip(path: Path, seconds: float) -> Path:
    """A seconds-long 224x224 25 fps H.264 + AAC clip (synthetic scene) at ``path``."""
    from worker.core.synthetic import ClipSpec, StreamConfig, encode_mp4, render_clip

    cfg = StreamConfig(seconds=seconds, fps=25, size=224, num_segments=1)
    frames, audio = render_clip(ClipSpec(0, 0, 12345), cfg)
    path.write_bytes(encode_mp4(frames, audio, cfg.fps, cfg.sample_rate, cfg.codec, cfg.crf))
    return path


def ffmpeg_binary() -> str | None:
    return shutil.which("ffmpeg")


def time_ffmpeg(binary: str, clip: Path, threads: int | None = None) -> tuple[float, float]:
    """(wall seconds of the whole command, ffmpeg's own decode 'rtime' or nan)."""
    args = [binary, "-v", "error", "-i", str(clip), "-f", "null", "-"]
    if threads is not None:  # -benchmark prints rtime at info level: its own, quieter run
        args = [binary, "-hide_banner", "-nostats", "-benchmark", "-threads", str(threads)]
        args += ["-i", str(clip), "-f", "null", "-"]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    match = re.search(r"rtime=([0-9.]+)s", done.stderr)
    return wall, float(match.group(1)) if match else float("nan")


def decode_child(clip: str, reps: int, torch_threads: int, with_ffmpeg: bool) -> dict:
    """In a fresh process: ``reps`` x (our decode, then ffmpeg's), interleaved."""
    import torch

    from worker.core.media import MediaConfig, decode_clip

    torch.set_num_threads(torch_threads)
    data, cfg, binary = Path(clip).read_bytes(), MediaConfig(), ffmpeg_binary()
    out: dict[str, list[float]] = {"ours": [], "ffmpeg": [], "ffmpeg_t1": [], "ffmpeg_rtime": []}
    decode_clip(data, cfg)  # first call loads codecs and caches the mel filters
    for _ in range(reps):
        started = time.perf_counter()
        decode_clip(data, cfg)
        out["ours"].append(time.perf_counter() - started)
        if with_ffmpeg and binary:
            out["ffmpeg"].append(time_ffmpeg(binary, Path(clip))[0])
            wall, rtime = time_ffmpeg(binary, Path(clip), threads=1)
            out["ffmpeg_t1"].append(wall)
            out["ffmpeg_rtime"].append(rtime)
    return out


def bench_decode(cfg: PerfConfig, workdir: Path) -> Comparison:
    from worker.decoding import init_decode_process

    clip = make_decode_clip(workdir / "decode.mp4", cfg.decode_seconds)
    binary = ffmpeg_binary()
    if binary is None:
        log.error("ffmpeg is not installed (apt-get install -y ffmpeg): no reference for decode")
    args = (str(clip), cfg.decode_reps, 1, True)
    worker_like = in_fresh_process(decode_child, *args, initializer=init_decode_process)
    old_way = {"OMP_WAIT_POLICY": None}  # the old worker: decode threads, OpenMP spinning
    reps = max(3, cfg.decode_reps // 3)
    two_threads = in_fresh_process(decode_child, str(clip), reps, 2, False, env=old_way)
    ms = [1000 * s for s in worker_like["ours"]]
    ref = Stats.of([1000 * s for s in worker_like["ffmpeg"]], "ms") if binary else None
    c = Comparison(
        "decode",
        f"bytes -> Clip, {cfg.decode_seconds:g} s 224x224 25 fps H.264+AAC "
        f"({clip.stat().st_size // 1024} KiB), base media config",
        "decode_clip in a decode process (torch 1 thread)",
        Stats.of(ms, "ms"),
        "ffmpeg -v error -i f.mp4 -f null - (both streams, whole clip)",
        ref,
        target="<= 1.0",
    )
    c.extra["before: decode_clip with 2 torch threads, OpenMP spinning (old worker)"] = Stats.of(
        [1000 * s for s in two_threads["ours"]], "ms"
    )
    if binary:
        c.extra["ffmpeg -threads 1 (wall, whole command)"] = Stats.of(
            [1000 * s for s in worker_like["ffmpeg_t1"]], "ms"
        )
        c.extra["ffmpeg -threads 1, its own decode time (-benchmark rtime, no process start)"] = (
            Stats.of([1000 * s for s in worker_like["ffmpeg_rtime"]], "ms")
        )
    else:
        c.notes.append("ffmpeg is MISSING on this machine: apt-get install -y ffmpeg")
    c.notes += _decode_notes()
    return c


def _decode_notes() -> list[str]:
    return [
        "ours decodes what the model needs: audio until 10.24 s (resampled to 16 kHz mono), "
        "video from the keyframe before the first of 4 frames to the last one; ffmpeg decodes "
        "every frame of both streams but also pays its process start (see its rtime).",
        "the worker decodes in separate processes with torch on one thread "
        "(worker/decoding.py); in the learner's process torch's OpenMP threads spin against "
        "FFmpeg (the 2-thread row).",
    ]


# ---------------------------------------------------------------------------------------
# 2. learner step

# what is timed: the paper's training step of each method, then the two ways the worker
# serves embeddings (FLAVA finishes its no-grad pass, the others embed after the update)
VARIANTS = ("flava", "er", "finetune", "flava+pre-update embeddings", "er+embed")


def make_learner(method: str, preset_name: str, memory_size: int, embeddings: bool = False):
    """A learner as the worker builds it; FLAVA with selection on from the first step and,
    unless ``embeddings``, without finishing its no-grad pass into embeddings."""
    from worker.core.learner import LearnerConfig, build_learner
    from worker.core.model import preset

    options = {"warmup_acc": 0.0, "pre_update_embeddings": embeddings}
    cfg = LearnerConfig(seed=0, memory_size=memory_size)
    cfg.options = options if method.startswith("flava") else {}
    return build_learner(method, preset(preset_name), cfg)


def random_batches(preset_name: str, batch: int, count: int) -> list:
    """``count`` batches of random normalised inputs (step cost does not depend on content)."""
    import torch

    from worker.core.learner import Batch
    from worker.core.model import preset

    c, g = preset(preset_name), torch.Generator().manual_seed(0)
    shape_v = (batch, c.num_frames, 3, c.frame_size, c.frame_size)
    return [
        Batch(
            torch.randn(batch, c.audio_frames, c.mel_bins, generator=g),
            torch.randn(shape_v, generator=g),
        )
        for _ in range(count)
    ]


def _variant(name: str, preset_name: str, batch: int):
    """(learner, step function) of a VARIANTS entry."""
    method, _, extra = name.partition("+")
    learner = make_learner(method, preset_name, 4 * batch, embeddings=bool(extra))
    if extra != "embed":
        return learner, learner.step

    def step_and_embed(b):
        stats = learner.step(b)
        learner.embed(b)
        return stats

    return learner, step_and_embed


def step_time_child(preset_name: str, batch: int, warmup: int, reps: int) -> dict:
    """Round robin over VARIANTS in one process: {variant: {"wall": [s], "cpu": [s]}}."""
    steps = {v: _variant(v, preset_name, batch)[1] for v in VARIANTS}
    batches = random_batches(preset_name, batch, 4)
    out: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in VARIANTS}
    for i in range(warmup + reps):
        for variant, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step(batches[i % len(batches)])
            if i >= warmup:
                out[variant]["wall"].append(time.perf_counter() - wall)
                out[variant]["cpu"].append(time.process_time() - cpu)
    return out


def step_flops_child(preset_name: str, batch: int) -> dict[str, float]:
    """Matmul FLOPs of one steady-state training step per method (attention not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for method in METHODS:
        learner = make_learner(method, preset_name, 4 * batch)
        first, second = random_batches(preset_name, batch, 2)
        learner.step(first)  # fills the replay memory
        counter = FlopCounterMode(display=False)
        with counter:
            learner.step(second)
        out[method] = float(counter.get_total_flops())
    return out


# the stages of Flava.step (worker/core/flava.py) and what they call, for the profile
FLAVA_STAGES = (
    "alignment_pass",
    "forward_modality",
    "forward_code",
    "clip_scores",
    "match",
    "backward_early",
    "select_current",
    "plan",
    "mae_loss",
    "_apply",
    "remember",
)


def step_profile_child(preset_name: str, batch: int, warmup: int, reps: int) -> dict:
    """cProfile of ``reps`` FLAVA steps: seconds per step in each of FLAVA_STAGES (inclusive;
    forward_modality counts both the no-grad all-token call and the masked one)."""
    import cProfile
    import pstats

    learner = make_learner("flava", preset_name, 4 * batch)
    batches = random_batches(preset_name, batch, 2)
    for i in range(warmup):
        learner.step(batches[i % 2])
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(reps):
        learner.step(batches[i % 2])
    profiler.disable()
    rows = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    out = {"step": 0.0, **dict.fromkeys(FLAVA_STAGES, 0.0)}
    for (path, _, name), (_, _, _, cumulative, _) in rows.items():
        if name in out and ("worker/core" in path or name == "step"):
            key = "step" if name == "step" and "flava.py" in path else name
            out[key] = max(out[key], cumulative / reps)
    return out


def step_memory_child(method: str, preset_name: str, batch: int, warmup: int) -> dict:
    """Peak memory of one steady-state step of ``method`` (its own fresh process)."""
    import torch

    learner = make_learner(method, preset_name, 4 * batch)
    batches = random_batches(preset_name, batch, 2)
    reset_peak_rss()
    rss_before = rss_bytes()
    for i in range(warmup + 1):
        learner.step(batches[i % 2])
    rss_delta = peak_rss_bytes() - rss_before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        learner.step(batches[1])
    return {"rss_delta": rss_delta, **_timeline_peak(prof)}


def _timeline_peak(prof) -> dict:
    """Peak of the live tensors during the profiled step, by category, inputs excluded."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the raw timeline export is deprecated, still works
        path = Path(tmp) / "timeline.raw.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    rows = [dict(zip(MEMORY_CATEGORIES, row[1:], strict=True)) for row in sizes]
    totals = [sum(r.values()) - r["input"] for r in rows]
    peak = max(range(len(rows)), key=totals.__getitem__)
    return {"peak": totals[peak], "at_peak": rows[peak]}


def bench_step(cfg: PerfConfig) -> list[Comparison]:
    argsets = [(m, cfg.step_preset, cfg.step_batch, cfg.step_warmup) for m in METHODS]
    memory = dict(zip(METHODS, in_fresh_processes(step_memory_child, argsets), strict=True))
    flops = {cfg.step_preset: in_fresh_process(step_flops_child, cfg.step_preset, cfg.step_batch)}
    if cfg.flops_base:
        flops["base (batch 2)"] = in_fresh_process(step_flops_child, "base", 2)
    args = (cfg.step_preset, cfg.step_batch, cfg.step_warmup, cfg.step_reps)
    times = in_fresh_process(step_time_child, *args)
    stages = in_fresh_process(step_profile_child, *args)
    setup = f"preset {cfg.step_preset}, batch {cfg.step_batch} (+{cfg.step_batch} replayed)"
    step_time = _step_time(times, flops, setup)
    total = stages.pop("step") or 1.0
    step_time.extra["cProfile of flava's step (share of the step, inclusive)"] = {
        name: f"{100 * seconds / total:.0f}%" for name, seconds in stages.items()
    }
    return [step_time, _step_memory(memory, setup)]


def _step_time(times: dict, flops: dict, setup: str) -> Comparison:
    ms = {v: Stats.of([1000 * s for s in times[v]["wall"]], "ms") for v in VARIANTS}
    c = Comparison(
        "step-time", f"learner step time, {setup}", "flava", ms["flava"], "er", ms["er"], "<= 1.0"
    )
    c.extra.update({v: ms[v] for v in VARIANTS[2:]})
    c.extra.update(
        {f"{v} CPU time": Stats.of([1000 * s for s in times[v]["cpu"]], "ms") for v in VARIANTS}
    )
    for where, counts in flops.items():
        parts = ", ".join(f"{m} {counts[m] / 1e9:.1f}" for m in METHODS)
        ratio = counts["flava"] / counts["er"]
        c.extra[f"GFLOP per step, {where}"] = f"{parts} (flava / er = {ratio:.2f})"
    c.notes += _step_time_notes()
    return c


def _step_time_notes() -> list[str]:
    return [
        "round robin: step i of every variant runs before step i+1 of any, in one process, "
        "so load from other jobs hits every variant alike; FLAVA has selection on (its "
        "steady state) and the replay memory is full after the warm-up.",
        "flava / er / finetune are the paper's training steps; 'flava+pre-update embeddings' "
        "also finishes FLAVA's no-grad pass into the clips' embeddings and 'er+embed' embeds "
        "after the update: the two ways the worker serves embeddings.",
        "FLOPs: torch.utils.flop_counter over one step (matmuls and convolutions; the fused "
        "attention kernels are not counted). FLAVA adds a no-grad pass over all tokens of the "
        "current clips (modality blocks, code pass, AVM) and saves half of the decoder: at the "
        "tiny preset (1-layer, 96-wide decoder) the decoder is a small share, at base (8 "
        "layers, 512 wide, 1296 tokens) the largest one.",
    ]


def _step_memory(memory: dict, setup: str) -> Comparison:
    mb = {m: Stats.of([memory[m]["peak"] / 2**20], "MiB") for m in METHODS}
    c = Comparison(
        "step-memory", f"peak memory of one step, {setup}", "flava", mb["flava"], "er", mb["er"]
    )
    c.target = "<= 0.6"
    c.extra["finetune"] = mb["finetune"]
    for m in METHODS:
        at_peak = memory[m]["at_peak"]
        parts = {k: round(v / 2**20, 2) for k, v in at_peak.items() if v and k != "input"}
        c.extra[f"{m}: MiB by kind at the peak"] = parts
        c.extra[f"{m}: peak RSS growth over its first steps"] = (
            f"{memory[m]['rss_delta'] / 2**20:.1f} MiB"
        )
    c.notes += _memory_notes()
    return c


def _memory_notes() -> list[str]:
    return [
        "peak = the largest sum of live tensors during one steady-state step, from "
        "torch.profiler's memory timeline (profile_memory, CPU): parameters, optimizer state, "
        "gradients, activations, temporaries; the replay store and the batch (inputs that "
        "existed before the step) are left out, as the paper keeps the memory on the CPU. "
        "Each method runs in its own process; the peak RSS growth over its first steps "
        "(VmHWM minus VmRSS before the first step) is a second view, which also counts the "
        "optimizer state, the replay store filling (4 x batch clips) and the allocator's cache.",
        "FLAVA's encoder sees floor(0.2 L) tokens, as ER's does; its saving is in the decoder "
        "(half the tokens) and the reconstruction targets. At the tiny preset the encoder "
        "holds most activations and the weights + Adam state are a third of the peak, so the "
        "ratio cannot come near the paper's base-preset 0.56 (whose ER also kept quadratic "
        "attention maps, which fused attention does not store).",
    ]


# ---------------------------------------------------------------------------------------
# run everything


def run_all(cfg: PerfConfig, only: set[str], out: Path) -> list[Comparison]:
    from bench.perf_service import ServiceConfig, run_service_benches

    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    comparisons: list[Comparison] = []
    with tempfile.TemporaryDirectory(prefix="flava-perf-") as tmp:
        workdir = Path(tmp)
        if "decode" in only:
            comparisons.append(bench_decode(cfg, workdir))
        if "step" in only:
            comparisons += bench_step(cfg)
        if "checkpoint" in only:
            comparisons += bench_checkpoint(**cfg.checkpoint)
        if "windows" in only:
            comparisons += bench_windows(WindowsConfig(**cfg.windows))
        if "upload" in only:  # a 10-minute upload through the running service
            comparisons += bench_upload(minutes=0.5 if cfg.quick else 10.0)
        if "ranks" in only:  # 1 vs 2 ranks of one learner
            comparisons += bench_ranks(cfg.quick)
        service_cfg = ServiceConfig(**{**cfg.service, "profile": cfg.profile})
        comparisons += run_service_benches(service_cfg, workdir, only)
    meta = {
        "quick": cfg.quick,
        "started": started,
        "wall_s": round(time.monotonic() - t0, 1),
        "machine": machine_note(),
        "config": asdict(cfg),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "perf.json", comparisons, meta)
    (out / "perf.md").write_text(markdown(comparisons, meta))
    plot_ratios(out / "perf.png", comparisons)
    return comparisons


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="minimal sizes (under two minutes)")
    p.add_argument(
        "--only",
        default="decode,step,checkpoint,service,ingest,embed",
        help="comma-separated benchmarks; also: windows (bench/perf_windows.py), upload"
        " (bench/perf_upload.py), ranks (bench/perf_ranks.py)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the worker and the API")
    p.add_argument("--checkpoint-presets", help="checkpoint bench presets, e.g. tiny,small")
    p.add_argument("--checkpoint-blocks", type=int, help="checkpoint bench ON/OFF block pairs")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    idle_openmp_threads_sleep()  # every process spawned from here runs torch like the worker
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = PerfConfig.quick_config() if args.quick else PerfConfig()
    cfg.profile = args.profile
    if args.checkpoint_presets:
        cfg.checkpoint["presets"] = tuple(args.checkpoint_presets.split(","))
    if args.checkpoint_blocks:
        cfg.checkpoint["blocks"] = args.checkpoint_blocks
    comparisons = run_all(cfg, set(args.only.split(",")), args.out)
    for c in comparisons:
        ratio = "n/a" if c.ratio is None else f"{c.ratio:.3g}"
        log.info("%-12s ratio %s (target %s, met %s)", c.bench, ratio, c.target or "-", c.met)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
