"""Entry point of the worker process: logging, signals, metrics server, the loop."""

from __future__ import annotations

import logging
import os
import signal
import threading

import redis
from prometheus_client import start_http_server

from worker.lease import LeaseTaken
from worker.ranks import RankGroup, RankWorker
from worker.runner import Worker
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def install_signal_handlers(stop: threading.Event, grace_s: float) -> None:
    """SIGTERM/SIGINT: stop reading, finish the batch in hand, ack, checkpoint, exit 0.

    If that takes longer than ``grace_s`` the process exits hard (status 3): unacked
    entries are redelivered, so nothing is lost, only the work since the last ack."""

    def handle(signum, _frame):
        if stop.is_set():
            return
        log.info("signal %s: finishing the batch in hand, then stopping", signum)
        stop.set()
        timer = threading.Timer(grace_s, _give_up, args=(grace_s,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _give_up(grace_s: float) -> None:
    log.error("shutdown took longer than %.0f s: exiting without a final checkpoint", grace_s)
    logging.shutdown()
    os._exit(3)


def run_worker(settings: WorkerSettings | None = None) -> None:
    """A plain learner, or one rank of a group when torchrun started the process."""
    settings = settings or WorkerSettings()
    group = RankGroup.from_environment()
    if group is not None:  # docs/distributed.md
        settings = group.settings_for(settings)
        group.join(settings.device)
    stop = threading.Event()
    install_signal_handlers(stop, settings.shutdown_grace_s)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5)
    log.info(
        "worker %s: method=%s preset=%s redis=%s",
        settings.consumer,
        settings.method,
        settings.preset,
        settings.redis_url,
    )
    try:
        worker = Worker(settings, client) if group is None else RankWorker(settings, client, group)
        worker.run(stop)
    except LeaseTaken as exc:  # a clear refusal, not a traceback
        log.error("not starting: %s", exc)
        raise SystemExit(2) from None
    finally:
        client.close()


if __name__ == "__main__":  # torchrun --nproc-per-node N -m worker.main: as `flava worker`
    import importlib
    import sys

    sys.exit(importlib.import_module("flava.cli").main(["worker", *sys.argv[1:]]))
