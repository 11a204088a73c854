"""Clip decoding for the worker, in a pool of separate processes.

Why processes, not threads of the learner's process: ``decode_clip`` runs a few torch ops (the
fbank, the frame normalisation). In the learner's process they wake torch's OpenMP team, whose
idle threads spin against FFmpeg's: a 10 s clip took 200-360 ms instead of ~60 ms on 2 cores.
``torch.set_num_threads`` is process-wide, so it cannot be lowered for decoding alone without
slowing the update. Each decode process runs torch on one thread (as DataLoader workers do),
never takes the learner's GIL, so decoding the next batch overlaps the current update, and a
decoder that crashes on a hostile clip takes down only its process.

Results cross the process boundary as numpy arrays (copied, no shared-memory handles to leak).

The decode processes die with their worker, even a SIGKILLed one: they are the worker's own
children ('spawn', not a forkserver's), and each asks the kernel for SIGKILL when its parent
dies (PR_SET_PDEATHSIG). Once they are gone, multiprocessing's resource tracker sees the last
writer close its pipe and exits too. Nothing is left to pile up across restarts.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from worker.core.media import Clip, MediaConfig, MediaError, Source, decode_clip

log = logging.getLogger(__name__)
MISSING_BLOB = "clip bytes expired or missing (claim-check blob not found)"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
START_TIMEOUT_S = 300.0  # spawning the decode processes (each imports torch) takes seconds


@dataclass(frozen=True)
class Decoded:
    """A decoded clip as it leaves a decode process."""

    fbank: np.ndarray  # (audio_frames, mel_bins) float32
    frames: np.ndarray  # (num_frames, 3, S, S) float32
    duration_s: float
    seconds: float  # decode time inside the decode process

    def clip(self) -> Clip:
        return Clip(torch.from_numpy(self.fbank), torch.from_numpy(self.frames), self.duration_s)


def init_decode_process(nice: int = 0, parent_pid: int | None = None) -> None:
    """Initializer of every decode process: torch on one thread (see the module docstring),
    and ``nice`` added to its scheduling niceness, so that decoding the next batch takes the
    cores the update leaves idle rather than slowing the update down. With ``parent_pid``,
    the process dies when that parent does."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    torch.set_num_threads(1)
    if nice:
        os.nice(nice)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), or exit now if it already has.

    The signal follows the parent *thread* that started the process: DecodePool starts its
    processes from the thread that builds it and submits (the worker's loop), which lives as
    long as the pool. The getppid check closes the race of a parent dying before the prctl."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


def decode_blob(
    blob: Source | None, cfg: MediaConfig, start_s: float | None = None
) -> Decoded | str:
    """Decode one clip (bytes, or a window of an upload's file from ``start_s``); a MediaError
    or missing bytes become its reason string."""
    if blob is None:
        return MISSING_BLOB
    started = time.perf_counter()
    try:
        clip = decode_clip(blob, cfg, start_s=start_s)
    except FileNotFoundError:
        return MISSING_BLOB
    except MediaError as exc:
        return f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    return Decoded(clip.fbank.numpy(), clip.frames.numpy(), clip.duration_s, seconds)


@dataclass
class PendingDecode:
    """A submitted decode: the bytes or file and start (for a retry) and the pool generation
    that runs it."""

    blob: Source | None
    future: Future
    generation: int
    submitted: float  # time.monotonic() at submit: the decode deadline counts from here
    start_s: float | None = None  # a window's span start in the upload's file
    retried: bool = False  # this is the clip's second decode (after a crash or a timeout)


Decode = Callable[[Source | None, MediaConfig, float | None], "Decoded | str"]


class DecodePool:
    """``processes`` decode processes; ``submit`` now, ``result`` later (in any order).

    A decode process that dies (FFmpeg crashing on a hostile clip) breaks the whole pool, and
    a decode past its deadline gets the processes killed (a hung FFmpeg cannot be interrupted):
    either way the pool is rebuilt, and each other clip it held (running, so broken, or queued,
    so cancelled) is decoded once more, alone, with a fresh deadline. A clip that kills its
    process again is reported as a reason string, to be dead-lettered.
    """

    def __init__(
        self,
        processes: int,
        cfg: MediaConfig,
        timeout_s: float = 60.0,
        nice: int = 0,
        decode: Decode = decode_blob,
    ):
        self.processes = max(1, processes)
        self.cfg = cfg
        self.timeout_s = timeout_s  # a clip still decoding this long after submit is refused
        self.nice = nice  # added to the decode processes' niceness
        self.decode = decode  # a module-level function (it is pickled to the processes)
        self.generation = 0
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        """Start the processes and wait until each is up, so that a clip's deadline measures
        its decode, not the seconds a spawned process takes to import torch."""
        executor = ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),  # children of this process
            initializer=init_decode_process,
            initargs=(self.nice, os.getpid()),
        )
        ready = [executor.submit(os.getpid) for _ in range(self.processes)]  # one spawn each
        for future in ready:
            future.result(timeout=START_TIMEOUT_S)
        return executor

    def submit(self, blob: Source | None, start_s: float | None = None) -> PendingDecode:
        """Decode a clip's bytes, or the window of an upload's file that starts at ``start_s``."""
        future = self._executor.submit(self.decode, blob, self.cfg, start_s)
        return PendingDecode(blob, future, self.generation, time.monotonic(), start_s)

    def result(self, pending: PendingDecode) -> Decoded | str:
        """The decoded clip or the reason it cannot be used."""
        if pending.generation != self.generation and not _succeeded(pending.future):
            return self._retry(pending)  # its processes were replaced while it waited
        outcome = self._wait(pending)
        return self._retry(pending) if outcome is None else outcome

    def _wait(self, pending: PendingDecode) -> Decoded | str | None:
        """The outcome by the clip's deadline; None if its processes were lost under it, or
        a first decode ran past it (both are retried once)."""
        left = pending.submitted + self.timeout_s - time.monotonic()
        try:
            return pending.future.result(timeout=max(left, 0.0))
        except FutureTimeout:
            return self._give_up(pending)
        except (BrokenProcessPool, CancelledError):
            log.warning("a decode process died; restarting the pool and retrying its clips")
            self._restart(pending.generation)
            return None

    def _retry(self, pending: PendingDecode) -> Decoded | str:
        """Decode a clip once more, alone on the current processes, with a fresh deadline."""
        retry = self.submit(pending.blob, pending.start_s)
        retry.retried = True
        outcome = self._wait(retry)
        return "the decoder process crashed on this clip (twice)" if outcome is None else outcome

    def _give_up(self, pending: PendingDecode) -> str | None:
        """A decode past its deadline: stop its processes (a hung FFmpeg cannot be
        interrupted otherwise) and start fresh ones; the batch's other clips are retried.

        A first timeout is retried too (None): the niced decode processes can be starved of
        CPU by other work on the machine, and a healthy window of a 1-hour upload was
        dead-lettered that way (1 of 1,406, bench/results/upload/); a clip that times out
        again, alone, is refused."""
        log.warning("a decode ran past %.0f s; restarting the decode processes", self.timeout_s)
        for process in list(getattr(self._executor, "_processes", {}).values()):
            process.kill()  # ProcessPoolExecutor offers no public way to stop a running task
        self._restart(pending.generation)
        if not pending.retried:
            return None
        return f"decoding took longer than {self.timeout_s:.0f} s, also retried alone"

    def _restart(self, broken_generation: int) -> None:
        """Replace the executor once per breakage (many futures report the same one)."""
        if broken_generation != self.generation:
            return
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._start()
        self.generation += 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
