"""One learner per consumer group: a lease key with a TTL, held by a process.

Two plain workers on one group would train two diverging models that overwrite each other's
published model, so the second refuses to start. The holder is the process, not only the
consumer name ("consumer|host|pid|start time"): two processes started with the same default
consumer name (the hostname) on one machine must not both learn. A process takes the lease
when it is free, its own, or held by a process that is gone: on the same host a pid that no
longer runs with that start time (a restart after a SIGKILL takes over at once); on another
host only when the TTL runs out (renewed at every heartbeat).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import redis

# KEYS: lease. ARGV: holder, ttl_ms, a gone holder it may replace ("" none).
# Takes or renews the lease (compare-and-set); returns the holder after the call.
LEASE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if (not current) or current == ARGV[1] or current == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return current
"""


class LeaseTaken(RuntimeError):
    """Another learner holds the group."""


def process_identity(consumer: str, pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{consumer}|{socket.gethostname()}|{pid}|{_start_time(pid)}"


def gone(holder: str) -> bool:
    """Whether ``holder`` is a process of this host that no longer runs."""
    parts = holder.split("|")
    if len(parts) != 4 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return False  # another host (or an unknown format): only its TTL can free it
    return _start_time(int(parts[2])) != parts[3]


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if it is gone or a zombie:
    killed and not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
    return "" if fields[0] == "Z" else fields[19]  # field 22 of stat: starttime


class Lease:
    """The learner lease of ``key`` for this process as ``consumer``."""

    def __init__(self, client: redis.Redis, key: str, consumer: str, ttl_s: float):
        self.key = key
        self.holder = process_identity(consumer)
        self.ttl_ms = int(ttl_s * 1000)
        self._script = client.register_script(LEASE_SCRIPT)
        self._client = client

    def take(self) -> None:
        """Take or renew the lease; raise LeaseTaken (with who holds it) if another has it."""
        current = self._call("")
        if current != self.holder and gone(current):
            current = self._call(current)  # its process is gone: take over
        if current != self.holder:
            consumer, host, pid, _ = (current.split("|") + ["?"] * 4)[:4]
            raise LeaseTaken(
                f"consumer {consumer!r} (pid {pid} on {host}) is already learning from this "
                "stream: a second plain worker would train a diverging model and overwrite "
                "its published one. Stop the other worker, or give this one another "
                "FLAVA_KEY_PREFIX."
            )

    def release(self) -> None:
        if _text(self._client.get(self.key)) == self.holder:
            self._client.delete(self.key)

    def _call(self, replaceable: str) -> str:
        return _text(self._script(keys=[self.key], args=[self.holder, self.ttl_ms, replaceable]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
