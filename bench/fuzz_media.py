"""Fuzz the API's probe (``service.probe.probe_clip``) and the worker's ``decode_clip`` with
mutated real clips (issue 13 §5).

A hand-written mutation fuzzer: the seeds are real encoded clips (every container/codec pair
of tests/test_media_corpus.py this PyAV can encode, the committed Ogg/Theora file, and the
hostile uploads of tests/hostile_media.py); each input is a seed with 1-4 stacked mutations
(bit flips, random or "interesting" bytes and integers, chunks deleted, duplicated or moved,
splices of two seeds, truncation). Each input goes through the probe and then
``decode_clip`` (the tiny preset's settings) in a child process:

- a child that dies (a signal: FFmpeg crashing) is a **crash**; its input is saved;
- a child that answers nothing for ``--timeout-s`` (10 s) is killed; the input is then run
  once more alone with the worker's decode deadline (``FLAVA_DECODE_TIMEOUT_S``, 60 s): past
  it, a **hang** (saved); under it, a slow input (counted, saved, its time kept);
- an exception other than the refusals each function documents (``ProbeError``,
  ``MediaError``) is an **error** (saved): the worker's decode process would raise it;
- peak RSS per input: the child resets its high-water mark (``/proc/self/clear_refs`` 5)
  before each input and reads ``VmHWM`` after; the figure kept is the growth over the
  child's resident size before the input (the idle child, torch imported, is its baseline).

    python -m bench.fuzz_media --minutes 10 --out bench/results/fuzz

writes ``summary.json`` and ``summary.md`` there, and ``crashes/``, ``hangs/``, ``errors/``,
``slow/`` with each such input (``<sha256 prefix>.bin``) when there are any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import select
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

WORKER_DECODE_TIMEOUT_S = 60.0  # worker/settings.py decode_timeout_s
FOLDERS = {"crash": "crashes", "hang": "hangs", "error": "errors", "slow": "slow"}  # kept
TARGET = "bench.fuzz_media:probe_and_decode"


# ---- the child: one long-lived process decoding inputs it reads from stdin -----------------
def probe_and_decode(data: bytes) -> dict:
    """Probe ``data`` as the API does, then decode it as the worker does (whatever the probe
    said: both are fuzzed); the outcome of each, as a refusal code or "ok"."""
    from service.probe import ProbeError, ProbeLimits, probe_clip
    from worker.core.media import MediaError, decode_clip
    from worker.core.model import preset

    out: dict = {}
    try:
        probe_clip(data, ProbeLimits())
        out["probe"] = "ok"
    except ProbeError as exc:
        out["probe"] = exc.code
    try:
        decode_clip(data, preset("tiny").media())
        out["decode"] = "ok"
    except MediaError as exc:
        out["decode"] = type(exc).__name__
    return out


def _child_main(target: str) -> None:
    """Read ``<u32 length><bytes>`` from stdin; answer one JSON line per input."""
    import importlib

    module, name = target.split(":")
    run = getattr(importlib.import_module(module), name)
    run(b"")  # import everything (torch, av) before the first timed input
    inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the decoders print goes to stderr, not into the answers
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        data = inp.read(struct.unpack("<I", head)[0])
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: the peak below is this input's
        started = time.perf_counter()
        try:
            answer = {"kind": "done", **run(data)}
        except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
            answer = {"kind": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
        answer["seconds"] = time.perf_counter() - started
        answer["rss_kb"] = before
        answer["peak_kb"] = _status_kb("VmHWM")
        out.write(json.dumps(answer) + "\n")
        out.flush()


def _status_kb(field_name: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


class Child:
    """A decoding child process; ``run`` sends one input and waits up to ``timeout_s``."""

    def __init__(self, target: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fuzz_media", "--child", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
        )
        self.buffer = b""

    def run(self, data: bytes, timeout_s: float) -> dict:
        """The child's answer; ``{"kind": "crash", "signal": n}`` if it died,
        ``{"kind": "timeout"}`` (the child is then killed) if it did not answer in time."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                return {"kind": "timeout"}
            chunk = os.read(fd, 65536)
            if not chunk:
                return self._died()
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def _died(self) -> dict:
        code = self.proc.wait()
        return {"kind": "crash", "signal": -code if code < 0 else None, "exit": code}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


# ---- seeds and mutations --------------------------------------------------------------------
def seed_clips() -> dict[str, bytes]:
    """Real encoded clips: the media corpus (each pair this PyAV encodes) and hostile uploads."""
    from dataclasses import replace

    import av

    from tests import hostile_media
    from tests.test_media_corpus import CORPUS
    from tests.worker.core.media_fixtures import encode_clip

    seeds: dict[str, bytes] = {}
    for name, (source, _) in CORPUS.items():
        if name == "4096x2160":  # 0.3 s of 4K: slow to decode, mostly zeros to mutate
            continue
        try:
            if isinstance(source, Path):
                seeds[name] = source.read_bytes()
            else:  # 1 s clips: smaller inputs, more of them per minute
                seeds[name] = encode_clip(replace(source, seconds=min(source.seconds, 1.0)))
        except (av.FFmpegError, ValueError):
            continue  # an encoder this PyAV lacks
    seeds["png mov, frames growing"] = hostile_media.png_mov([(32, 32), (640, 480)])
    seeds["mp3 with cover art"] = hostile_media.cover_art_mp3()
    for name, data in hostile_media.path_following("/etc/hostname").items():
        seeds[name] = data
    return seeds


INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


class Mutator:
    """Stacked random mutations of a seed (a few bytes to a few chunks each)."""

    def __init__(self, seeds: list[bytes], rng: random.Random):
        self.seeds, self.rng = seeds, rng
        self.ops = [
            self.flip_bits,
            self.random_bytes,
            self.interesting_int,
            self.delete_chunk,
            self.duplicate_chunk,
            self.move_chunk,
            self.splice,
            self.truncate,
            self.header_bytes,
        ]

    def mutate(self) -> tuple[bytes, list[str]]:
        data = bytearray(self.rng.choice(self.seeds))
        names = []
        for _ in range(self.rng.choice([1, 1, 2, 2, 3, 4])):
            op = self.rng.choice(self.ops)
            if data:
                data = op(data)
                names.append(op.__name__)
        return bytes(data), names

    def _pos(self, data: bytearray) -> int:
        # half the mutations land in the first 512 bytes: the headers the demuxers parse
        if self.rng.random() < 0.5:
            return self.rng.randrange(min(len(data), 512))
        return self.rng.randrange(len(data))

    def _span(self, data: bytearray) -> tuple[int, int]:
        start = self._pos(data)
        return start, min(len(data), start + self.rng.choice([1, 4, 16, 64, 256, 4096]))

    def flip_bits(self, data: bytearray) -> bytearray:
        for _ in range(self.rng.randint(1, 8)):
            data[self._pos(data)] ^= 1 << self.rng.randrange(8)
        return data

    def random_bytes(self, data: bytearray) -> bytearray:
        start, end = self._span(data)
        data[start:end] = self.rng.randbytes(end - start)
        return data

    def interesting_int(self, data: bytearray) -> bytearray:
        width = self.rng.choice([1, 2, 4])
        value = self.rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
        order = self.rng.choice(["little", "big"])
        start = self._pos(data)
        data[start : start + width] = value.to_bytes(width, order)
        return data

    def header_bytes(self, data: bytearray) -> bytearray:
        """A 32-bit big-endian size before a 4-letter box/chunk name (MP4, MOV, RIFF...)."""
        names = [i for i in range(4, min(len(data), 4096) - 4) if data[i : i + 4].isalpha()]
        if not names:
            return self.interesting_int(data)
        at = self.rng.choice(names)
        value = self.rng.choice([*INTERESTING, self.rng.randrange(1 << 32)])
        data[at - 4 : at] = (value & 0xFFFFFFFF).to_bytes(4, "big")
        return data

    def delete_chunk(self, data: bytearray) -> bytearray:
        start, end = self._span(data)
        del data[start:end]
        return data

    def duplicate_chunk(self, data: bytearray) -> bytearray:
        start, end = self._span(data)
        at = self._pos(data)
        data[at:at] = data[start:end] * self.rng.choice([1, 2, 16])
        return data

    def move_chunk(self, data: bytearray) -> bytearray:
        start, end = self._span(data)
        piece = data[start:end]
        del data[start:end]
        at = self.rng.randrange(len(data) + 1)
        data[at:at] = piece
        return data

    def splice(self, data: bytearray) -> bytearray:
        other = self.rng.choice(self.seeds)
        cut = self._pos(data)
        return data[:cut] + other[self.rng.randrange(len(other)) :]

    def truncate(self, data: bytearray) -> bytearray:
        return data[: self._pos(data) + 1]


# ---- the run --------------------------------------------------------------------------------
@dataclass
class Tally:
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0  # past the worker's decode deadline
    errors: int = 0  # an exception other than the documented refusals
    slow: int = 0  # past --timeout-s, under the worker's deadline
    max_peak_rss_mb: float = 0.0  # the child's high-water mark during one input
    max_peak_growth_mb: float = 0.0  # ... over its resident size before the input
    max_seconds: float = 0.0  # the slowest answered input
    probe: Counter = field(default_factory=Counter)
    decode: Counter = field(default_factory=Counter)
    probe_ok_decode_refused: int = 0  # the contract: what the probe accepts, decode decodes
    mutations: Counter = field(default_factory=Counter)
    kept: list = field(default_factory=list)


def fuzz(
    seeds: dict[str, bytes],
    seconds: float,
    out: Path,
    jobs: int = 2,
    seed: int = 0,
    timeout_s: float = 10.0,
    hang_timeout_s: float = WORKER_DECODE_TIMEOUT_S,
    target: str = TARGET,
    max_inputs: int | None = None,
) -> Tally:
    """Run ``jobs`` children for ``seconds`` (or ``max_inputs``); keep what crashed, hung,
    raised or ran slow under ``out``."""
    tally, lock = Tally(), threading.Lock()
    deadline = time.monotonic() + seconds
    pool = list(seeds.values())

    def keep(kind: str, data: bytes, names: list[str], answer: dict) -> None:
        digest = hashlib.sha256(data).hexdigest()[:16]
        folder = out / FOLDERS[kind]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{digest}.bin").write_bytes(data)
        tally.kept.append({"kind": kind, "file": f"{folder.name}/{digest}.bin", "mutations": names,
                           "answer": answer})  # fmt: skip

    def loop(job: int) -> None:
        mutator = Mutator(pool, random.Random(seed * 1000 + job))
        child = Child(target)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if max_inputs is not None and tally.inputs >= max_inputs:
                        return
                    tally.inputs += 1
                data, names = mutator.mutate()
                answer = child.run(data, timeout_s)
                if answer["kind"] == "timeout":  # once more, alone, with the worker's deadline
                    child = Child(target)
                    started = time.monotonic()
                    answer = child.run(data, hang_timeout_s)
                    answer.setdefault("seconds", time.monotonic() - started)
                    if answer["kind"] == "timeout":
                        answer["kind"] = "hang"
                    elif answer["kind"] == "done":
                        answer["kind"] = "slow"
                with lock:
                    record(tally, answer, names)
                    if answer["kind"] in FOLDERS:
                        keep(answer["kind"], data, names, answer)
                if answer["kind"] in ("crash", "hang"):
                    child = Child(target)
        finally:
            child.close()

    threads = [threading.Thread(target=loop, args=(j,), daemon=True) for j in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def record(tally: Tally, answer: dict, names: list[str]) -> None:
    kind = answer["kind"]
    tally.mutations.update(names)
    if kind == "crash":
        tally.crashes += 1
        return
    if kind == "hang":
        tally.hangs += 1
        return
    if kind == "error":
        tally.errors += 1
    if kind == "slow":
        tally.slow += 1
    if "probe" in answer:
        tally.probe[answer["probe"]] += 1
        tally.decode[answer["decode"]] += 1
        if answer["probe"] == "ok" and answer["decode"] != "ok":
            tally.probe_ok_decode_refused += 1
    tally.max_seconds = max(tally.max_seconds, answer.get("seconds", 0.0))
    if "peak_kb" in answer:
        tally.max_peak_rss_mb = max(tally.max_peak_rss_mb, answer["peak_kb"] / 1024)
        growth = (answer["peak_kb"] - answer["rss_kb"]) / 1024
        tally.max_peak_growth_mb = max(tally.max_peak_growth_mb, growth)


def report(tally: Tally, seeds: dict[str, bytes], args: argparse.Namespace, wall_s: float) -> dict:
    import av

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    summary = {f.name: getattr(tally, f.name) for f in fields(tally)}
    for key in ("probe", "decode", "mutations"):  # Counters, most common first
        summary[key] = dict(summary[key].most_common())
    summary["max_peak_rss_mb"] = round(tally.max_peak_rss_mb, 1)
    summary["max_peak_growth_mb"] = round(tally.max_peak_growth_mb, 1)
    summary["max_seconds"] = round(tally.max_seconds, 3)
    summary["run"] = {
        "wall_s": round(wall_s, 1),
        "inputs_per_s": round(tally.inputs / max(wall_s, 1e-9), 2),
        "jobs": args.jobs,
        "seed": args.seed,
        "timeout_s": args.timeout_s,
        "hang_timeout_s": WORKER_DECODE_TIMEOUT_S,
        "seeds": {name: len(data) for name, data in seeds.items()},
        "commit": commit,
        "pyav": av.__version__,
        "ffmpeg": ".".join(map(str, av.library_versions["libavformat"])),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    return summary


def markdown(summary: dict) -> str:
    run = summary["run"]
    lines = [
        "# Fuzzing the probe and decode_clip (bench/fuzz_media.py)",
        "",
        f"Commit {run['commit']}, PyAV {run['pyav']} (libavformat {run['ffmpeg']}), "
        f"{run['machine']}, {run['jobs']} child processes, seed {run['seed']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| wall time | {run['wall_s']} s |",
        f"| inputs tried | {summary['inputs']} ({run['inputs_per_s']}/s) |",
        f"| seeds (real encoded clips + hostile uploads) | {len(run['seeds'])} |",
        f"| crashes (child killed by a signal) | {summary['crashes']} |",
        f"| hangs (past the worker's {run['hang_timeout_s']:.0f} s decode deadline) "
        f"| {summary['hangs']} |",
        f"| slow (past {run['timeout_s']:.0f} s, under the deadline) | {summary['slow']} |",
        f"| errors (an exception other than ProbeError / MediaError) | {summary['errors']} |",
        f"| slowest answered input | {summary['max_seconds']} s |",
        f"| max peak RSS of a decoding child | {summary['max_peak_rss_mb']} MB |",
        f"| max peak RSS growth during one input | {summary['max_peak_growth_mb']} MB |",
        f"| probe accepted, decode refused | {summary['probe_ok_decode_refused']} |",
        "",
        "Probe outcomes: " + ", ".join(f"{k} {v}" for k, v in summary["probe"].items()),
        "",
        "Decode outcomes: " + ", ".join(f"{k} {v}" for k, v in summary["decode"].items()),
        "",
    ]
    if summary["kept"]:
        lines += ["## Kept inputs", ""]
        lines += [f"- {k['kind']}: `{k['file']}` ({', '.join(k['mutations'])}): {k['answer']}"
                  for k in summary["kept"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--jobs", type=int, default=2, help="decoding child processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=10.0, help="then rerun with 60 s")
    p.add_argument("--out", type=Path, default=Path("bench/results/fuzz"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child_main(args.child)
        return 0
    seeds = seed_clips()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tally = fuzz(seeds, args.minutes * 60, args.out, args.jobs, args.seed, args.timeout_s)
    summary = report(tally, seeds, args, time.monotonic() - started)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 1 if tally.crashes or tally.hangs or tally.errors else 0


if __name__ == "__main__":
    sys.exit(main())
