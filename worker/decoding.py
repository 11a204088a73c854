"""Clip decoding for the worker, in a pool of separate processes.

Why processes, not threads of the learner's process: ``decode_clip`` runs a few torch ops (the
fbank, the frame normalisation). In the learner's process they wake torch's OpenMP team, whose
idle threads spin against FFmpeg's: a 10 s clip took 200-360 ms instead of ~60 ms on 2 cores.
``torch.set_num_threads`` is process-wide, so it cannot be lowered for decoding alone without
slowing the update. Each decode process runs torch on one thread (as DataLoader workers do),
never takes the learner's GIL, so decoding the next batch overlaps the current update, and a
decoder that crashes on a hostile clip takes down only its process.

Results cross the process boundary as numpy arrays (copied, no shared-memory handles to leak).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from worker.core.media import Clip, MediaConfig, MediaError, decode_clip

log = logging.getLogger(__name__)
MISSING_BLOB = "clip bytes expired or missing (claim-check blob not found)"


@dataclass(frozen=True)
class Decoded:
    """A decoded clip as it leaves a decode process."""

    fbank: np.ndarray  # (audio_frames, mel_bins) float32
    frames: np.ndarray  # (num_frames, 3, S, S) float32
    duration_s: float
    seconds: float  # decode time inside the decode process

    def clip(self) -> Clip:
        return Clip(torch.from_numpy(self.fbank), torch.from_numpy(self.frames), self.duration_s)


def init_decode_process(nice: int = 0) -> None:
    """Initializer of every decode process: torch on one thread (see the module docstring),
    and ``nice`` added to its scheduling niceness, so that decoding the next batch takes the
    cores the update leaves idle rather than slowing the update down."""
    torch.set_num_threads(1)
    if nice:
        os.nice(nice)


def decode_blob(blob: bytes | None, cfg: MediaConfig) -> Decoded | str:
    """Decode one clip's bytes; a MediaError or a missing blob becomes its reason string."""
    if blob is None:
        return MISSING_BLOB
    started = time.perf_counter()
    try:
        clip = decode_clip(blob, cfg)
    except MediaError as exc:
        return f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    return Decoded(clip.fbank.numpy(), clip.frames.numpy(), clip.duration_s, seconds)


@dataclass
class PendingDecode:
    """A submitted decode: the bytes (for a retry) and the pool generation that runs it."""

    blob: bytes | None
    future: Future
    generation: int
    submitted: float  # time.monotonic() at submit: the decode deadline counts from here


class DecodePool:
    """``processes`` decode processes; ``submit`` now, ``result`` later (in any order).

    A decode process that dies (FFmpeg crashing on a hostile clip) breaks the whole pool:
    the pool is rebuilt and each clip it held is decoded once more, alone; a clip that kills
    its process again is reported as a reason string, to be dead-lettered.
    """

    def __init__(self, processes: int, cfg: MediaConfig, timeout_s: float = 60.0, nice: int = 0):
        self.processes = max(1, processes)
        self.cfg = cfg
        self.timeout_s = timeout_s  # a clip still decoding this long after submit is refused
        self.nice = nice  # added to the decode processes' niceness
        self.generation = 0
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # forkserver: children fork from a clean server that imported this module once, so a
        # (re)start is fast and never inherits the learner's OpenMP threads
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return ProcessPoolExecutor(
            self.processes,
            mp_context=context,
            initializer=init_decode_process,
            initargs=(self.nice,),
        )

    def submit(self, blob: bytes | None) -> PendingDecode:
        future = self._executor.submit(decode_blob, blob, self.cfg)
        return PendingDecode(blob, future, self.generation, time.monotonic())

    def result(self, pending: PendingDecode) -> Decoded | str:
        """The decoded clip or the reason it cannot be used."""
        left = pending.submitted + self.timeout_s - time.monotonic()
        try:
            return pending.future.result(timeout=max(left, 0.0))
        except FutureTimeout:
            return self._give_up(pending)
        except BrokenProcessPool:
            log.warning("a decode process died; restarting the pool and retrying its clips")
        self._restart(pending.generation)
        try:
            return self._executor.submit(decode_blob, pending.blob, self.cfg).result()
        except BrokenProcessPool:
            self._restart(self.generation)
            return "the decoder process crashed on this clip (twice)"

    def _give_up(self, pending: PendingDecode) -> str:
        """A decode past its deadline: stop its processes (a hung FFmpeg cannot be
        interrupted otherwise) and start fresh ones; the batch's other clips are retried."""
        log.warning("a decode ran past %.0f s; restarting the decode processes", self.timeout_s)
        for process in list(getattr(self._executor, "_processes", {}).values()):
            process.kill()  # ProcessPoolExecutor offers no public way to stop a running task
        self._restart(pending.generation)
        return f"decoding took longer than {self.timeout_s:.0f} s"

    def _restart(self, broken_generation: int) -> None:
        """Replace the executor once per breakage (many futures report the same one)."""
        if broken_generation != self.generation:
            return
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._start()
        self.generation += 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
