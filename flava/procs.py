"""Process helpers shared by the ``flava`` command, the demo, the benchmarks and the tests.

Each piece of the service runs as its own OS process (``python -m flava serve|worker``),
so crashes, kills and restarts are real. :func:`wait_until_ready` is the one way to wait
for such a process's HTTP endpoint; :func:`idle_openmp_threads_sleep` is how every process
that runs torch sets OpenMP up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_openmp_threads_sleep() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set: torch's idle OpenMP threads sleep, not spin.

    Set before anything imports torch (OpenMP reads it once). Spinning threads steal
    the cores the decode processes, the API and Redis need between the learner's parallel
    regions: on a busy 2-core machine a tiny-preset step took 1-7 s spinning, 0.4-0.6 s
    sleeping (bench/results/perf.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def wait_until_ready(
    url: str,
    timeout_s: float = 120.0,
    procs: Iterable[subprocess.Popen] = (),
    log: Path | None = None,
    headers: dict[str, str] | None = None,
    interval_s: float = 0.2,
    client=None,
) -> None:
    """Poll ``url`` (``/healthz``, ``/readyz``, a ``/metrics`` port) until it answers 200.

    ``client``: an ``httpx.Client`` to poll with (a FastAPI ``TestClient`` and a relative
    ``url`` for an in-process app); by default a fresh request each time, 2 s timeout.
    Raises RuntimeError at once if one of ``procs`` exits meanwhile, TimeoutError after
    ``timeout_s``; both end with the tail of ``log`` when one is given."""
    import httpx  # not at module level: `flava serve` imports this module

    deadline = time.monotonic() + timeout_s
    procs = list(procs)
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}{_tail(log)}")
        try:
            if client is not None:
                answer = client.get(url, headers=headers)
            else:
                answer = httpx.get(url, headers=headers, timeout=2.0)
            if answer.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s{_tail(log)}")
        time.sleep(interval_s)


def _tail(log: Path | None, chars: int = 2000) -> str:
    if log is None or not log.exists():
        return ""
    return "\n" + log.read_text(errors="replace")[-chars:]


def spawn(args: list[str], env: dict, logfile: Path) -> subprocess.Popen:
    """``python -m flava *args`` with its output appended to ``logfile``."""
    out = open(logfile, "ab")  # noqa: SIM115 - the child keeps it; closed when we exit
    return subprocess.Popen(
        [sys.executable, "-m", "flava", *args], env=env, stdout=out, stderr=subprocess.STDOUT
    )


def terminate(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class RedisProcess:
    """A private redis-server on a free port with an fsync-always append-only file,
    so a restart keeps every acknowledged write (``appendfsync="everysec"`` trades the last
    second for throughput, as most deployments do; the performance benchmarks use it)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        appendfsync: str = "always",
        extra_args: tuple[str, ...] = (),
    ):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.extra_args = extra_args  # more redis-server options, e.g. ("--maxmemory", "2mb")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--dir",
                str(self.workdir),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_up(timeout)

    def wait_up(self, timeout: float) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """SIGTERM (Redis finishes its AOF), then SIGKILL if it has not exited in 10 s (a
        replica still syncing can ignore the first signal for long on a loaded machine)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
