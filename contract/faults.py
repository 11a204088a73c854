"""Which Redis errors mean "not now": the API answers them 503 + Retry-After, never 500,
and the worker waits them out with backoff, never counting them as a training failure.

Each of these leaves the request unapplied (a script's first write is refused before any
other, so INGEST_SCRIPT writes nothing), so the client may safely send it again later.
Any other Redis error is a bug (a wrong type, a script error) and stays a 500.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


@dataclass(frozen=True)
class Unavailable:
    """The 503's ``detail``: a stable code for clients and a reason for people."""

    code: str
    reason: str


# (exception class, code, reason); the first match wins, so subclasses come first
# (BusyLoadingError is a ConnectionError, MasterDownError a ResponseError).
_KNOWN: tuple[tuple[type[RedisError], str, str], ...] = (
    (BusyLoadingError, "redis_loading", "Redis is loading its data after a restart"),
    (
        OutOfMemoryError,
        "redis_out_of_memory",
        "Redis is at its maxmemory limit (noeviction): the queue must drain first",
    ),
    (ReadOnlyError, "redis_read_only", "Redis is a read-only replica (a failover is under way)"),
    (MasterDownError, "redis_master_down", "the replica lost its primary"),
    (TryAgainError, "redis_try_again", "Redis asked to try again"),
    (RedisConnectionError, "redis_unreachable", "Redis is unreachable"),
    (RedisTimeoutError, "redis_timeout", "Redis did not answer in time"),
)
# redis-py has no class for BUSY: a plain ResponseError whose text keeps the code, at its
# start, or quoted after "Command # 1 (...) of pipeline caused error: " for a pipeline
_BUSY = re.compile(r"(^|')BUSY ")


def unavailable(exc: BaseException) -> Unavailable | None:
    """The 503 reason for a transient Redis error; None for any other error."""
    for cls, code, reason in _KNOWN:
        if isinstance(exc, cls):
            return Unavailable(code, reason)
    if isinstance(exc, RedisError) and _BUSY.search(str(exc)):
        return Unavailable("redis_busy", "Redis is busy running a long script")
    return None


# NOGROUP (or XINFO's "no such key"), also quoted inside a pipeline's error
_LOST = re.compile(r"(^|')(NOGROUP |no such key)")


def lost_group(exc: BaseException) -> bool:
    """The stream or its consumer group is gone: Redis lost its data (a queue reset)."""
    return isinstance(exc, ResponseError) and bool(_LOST.search(str(exc)))
