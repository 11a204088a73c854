"""Prometheus metrics of the API process (module constants: defined once per process).

With several API processes (``flava serve --workers N``) each keeps its values in files under
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, chosen when the variable
is set at import) and /metrics adds them up, whichever process answers: counters and
histograms are summed over every process that ever ran, dead ones included, so they never
go back; each gauge says how its processes' values combine (``multiprocess_mode``).
"""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

INGEST_REQUESTS = Counter(
    "flava_ingest_requests_total", "POST /ingest answers by outcome", ["outcome"]
)
INGEST_BYTES = Counter("flava_ingest_bytes_total", "Bytes of clips accepted into the queue")
INGEST_SECONDS = Histogram(
    "flava_ingest_seconds",
    "Time to validate and enqueue one upload",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EMBED_REQUESTS = Counter("flava_embed_requests_total", "GET /embed answers by outcome", ["outcome"])
EMBED_SECONDS = Histogram(
    "flava_embed_seconds",
    "Time to answer GET /embed",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
# Read from Redis by whichever process answers /metrics (or ingests): the newest value of the
# live processes is the queue's, an older one is stale; a dead process's value is dropped.
BACKLOG = Gauge(
    "flava_backlog_clips",
    "Clips accepted and not yet acked by a worker",
    multiprocess_mode="livemostrecent",
)
DEAD_LETTERS = Gauge(
    "flava_dead_letter_clips",
    "Entries in the dead-letter stream",
    multiprocess_mode="livemostrecent",
)
REDIS_UP = Gauge(
    "flava_api_redis_up",
    "1 if the API reached Redis on its last try",
    multiprocess_mode="livemostrecent",  # the last try of any live API process
)
REDIS_UNAVAILABLE = Counter(
    "flava_api_redis_unavailable_total",
    "Requests answered 503 because Redis was down or refused (OOM, READONLY, BUSY, ...)",
    ["code"],
)
QUERY_SECONDS = Histogram(
    "flava_query_seconds",
    "POST /embed: from queuing the request to the embedder's reply (not decoding the upload)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


# ---- for the alert rules (deploy/alerts.yml) ------------------------------------------------
BACKLOG_LIMIT = Gauge(
    "flava_backlog_limit_clips",
    "FLAVA_MAX_BACKLOG: past this many unacked clips /ingest answers 429",
    multiprocess_mode="livemax",
)
HTTP_RESPONSES = Counter(
    "flava_http_responses_total",
    "Answers of every route by status class (2xx .. 5xx; an unhandled error counts as 5xx)",
    ["status_class"],
)


class CountResponses:
    """ASGI middleware: count each HTTP answer by status class (FlavaApiErrors alerts on 5xx).

    Outermost but inside Starlette's error handler, so an exception that escapes a route is
    counted here as the 500 it becomes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            HTTP_RESPONSES.labels(f"{status['code'] // 100}xx").inc()


def exposition() -> bytes:
    """The text /metrics serves: this process's metrics, or with PROMETHEUS_MULTIPROC_DIR set,
    every API process's added up (a fresh registry per scrape, as prometheus_client says)."""
    if not os.environ.get(MULTIPROC_DIR):
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def process_exit() -> None:
    """Drop this process's live gauges from the sums (an API process that shuts down)."""
    if os.environ.get(MULTIPROC_DIR):
        multiprocess.mark_process_dead(os.getpid())
