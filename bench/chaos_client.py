"""The chaos run's client: sends the stream, samples clip states, re-sends clips lost in a reset.

Two threads. The sender POSTs a drifting synthetic stream (waiting out 429/503 and outages
as a client should), keeping at most ``window`` clips accepted and not yet settled, and
re-sends what the watcher reports lost. The watcher samples the state of every unsettled clip
in Redis twice a second: ``learned`` (with the time from the API's ``received_at``), ``dead``,
or gone, in which case it asks ``GET /embed?clip_id=..&epoch=..`` the way a client would: 410
``status: reset`` means Redis lost its data after the 202 (counted, re-sent); 404 means the
queue was not reset and the clip vanished anyway (``vanished_unreported``: lost).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass

import httpx
import redis

from contract import wire

log = logging.getLogger(__name__)


@dataclass
class Accepted:
    epoch: str  # queue_epoch of the 202
    data: bytes  # kept to re-send it after a reset


class Client:
    """``start``, then read ``settled()``/``finished()``; ``figures()`` once stopped."""

    def __init__(self, api_url: str, token: str, redis_url: str, prefix: str, cfg):
        self.cfg, self.redis_url, self.keys = cfg, redis_url, wire.Keys(prefix)
        self.http = httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=15.0
        )
        self.lock = threading.Lock()
        self.accepted: dict[str, Accepted] = {}
        self.learned: dict[str, float] = {}  # clip id -> seconds from received_at to learned
        self.dead: set[str] = set()
        self.processed: set[str] = set()  # seen embedded or learned: the model has had them
        self.unreported: set[str] = set()  # vanished without a reset: lost
        self.resent: set[str] = set()
        self.resend: queue.Queue[str] = queue.Queue()
        self.resending: set[str] = set()  # reported lost, not yet accepted again
        self.sent = self.rejected = self.vanished = 0
        self.last_learned = 0.0  # unix time the watcher last saw a clip become learned
        self._stop = threading.Event()
        self._done_sending = threading.Event()
        self._threads = [
            threading.Thread(target=self._send_all, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=30)
        self.http.close()

    def settled(self) -> int:
        with self.lock:
            return len(self.learned) + len(self.dead) + len(self.unreported)

    def progress(self) -> int:
        """Clips the worker got through (published or dead-lettered): paces the faults."""
        with self.lock:
            return len(self.processed) + len(self.dead)

    def finished(self) -> bool:
        """The whole stream was sent and no re-send is waiting."""
        return self._done_sending.is_set() and not self.resending

    def all_settled(self) -> bool:
        """The whole stream was sent and every accepted clip is settled."""
        return self.finished() and self.settled() == len(self.accepted)

    # ---- sending ------------------------------------------------------------------------
    def _send_all(self) -> None:
        for data in self._stream():
            self._wait_for_room()
            self._send(data)
            self._resend_waiting()
            if self._stop.is_set():
                return
        self._done_sending.set()
        while not self._stop.wait(0.2):
            self._resend_waiting()

    def _stream(self):
        from worker.core.synthetic import StreamConfig, drifting_stream

        scfg = StreamConfig(num_segments=4)
        per_segment = -(-self.cfg.clips // scfg.num_segments)
        stream = drifting_stream(scfg, per_segment, self.cfg.seed)
        for i, (_, data) in zip(range(self.cfg.clips), stream, strict=False):
            bad = self.cfg.bad_every and i % self.cfg.bad_every == self.cfg.bad_every // 2
            yield _corrupt(data, i) if bad else data

    def _wait_for_room(self) -> None:
        while len(self.accepted) - self.settled() >= self.cfg.window and not self._stop.is_set():
            time.sleep(0.1)

    def _resend_waiting(self) -> None:
        while not self.resend.empty():
            cid = self.resend.get()
            self._send(self.accepted[cid].data, resend=True)

    def _send(self, data: bytes, resend: bool = False) -> None:
        """POST until the API answers 2xx (accepted) or a 4xx other than 429 (rejected)."""
        self.sent += not resend
        while not self._stop.is_set():
            try:
                r = self.http.post(
                    "/ingest",
                    content=data,
                    params={"task": "chaos"},
                    headers={"Content-Type": "video/mp4"},
                )
            except httpx.TransportError:
                r = None
            if r is not None and r.status_code in (200, 202):
                self._accepted(r.json(), data, resend)
                return
            if r is not None and r.status_code < 500 and r.status_code != 429:
                self.rejected += 1
                return
            time.sleep(float(r.headers.get("Retry-After", "0.5")) if r is not None else 0.5)

    def _accepted(self, body: dict, data: bytes, resend: bool) -> None:
        cid = body["clip_id"]
        with self.lock:
            self.accepted[cid] = Accepted(body.get("queue_epoch", ""), data)
            if resend:
                self.resent.add(cid)
                self.resending.discard(cid)

    # ---- watching -----------------------------------------------------------------------
    def _watch(self) -> None:
        r = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        while not self._stop.wait(0.5):
            try:
                self._sample(r)
            except (redis.RedisError, httpx.HTTPError) as exc:
                log.debug("watcher: %s", exc)  # Redis or the API restarting: next round
        r.close()

    def _sample(self, r: redis.Redis) -> None:
        with self.lock:
            ids = [c for c in self.accepted if not self._is_settled(c)]
        pipe = r.pipeline(transaction=False)
        for cid in ids:
            pipe.hmget(self.keys.clip(cid), "state", "received_at")
        now = time.time()
        for cid, (state, received) in zip(ids, pipe.execute() if ids else [], strict=True):
            if state in (b"embedded", b"learned"):
                self.processed.add(cid)
            if state == b"learned":
                self._learned(cid, now - float(received or now), now)
            elif state == b"dead":
                with self.lock:
                    self.dead.add(cid)
            elif state is None:
                self._gone(cid)

    def _is_settled(self, cid: str) -> bool:
        done = cid in self.learned or cid in self.dead or cid in self.unreported
        return done or cid in self.resending

    def _learned(self, cid: str, seconds: float, now: float) -> None:
        with self.lock:
            self.learned[cid] = seconds
            self.last_learned = now

    def _gone(self, cid: str) -> None:
        """Ask the API what became of a clip Redis no longer knows."""
        epoch = self.accepted[cid].epoch
        r = self.http.get("/embed", params={"clip_id": cid, "epoch": epoch})
        if r.status_code == 410 and r.json().get("status") == "reset":
            with self.lock:
                self.vanished += 1
                self.resending.add(cid)
            self.resend.put(cid)
        elif r.status_code == 404:
            log.error("clip %s vanished without a queue reset", cid[:12])
            with self.lock:
                self.unreported.add(cid)

    # ---- the figures ----------------------------------------------------------------------
    def figures(self) -> dict:
        latencies = sorted(self.learned.values())
        lost = set(self.accepted) - set(self.learned) - self.dead
        return {
            "clips": self.sent,
            "accepted": len(self.accepted),
            "rejected": self.rejected,
            "learned": len(self.learned),
            "dead_lettered": len(self.dead),
            "lost": len(lost),
            "vanished_reported": self.vanished,
            "vanished_unreported": len(self.unreported),
            "resent_after_reset": len(self.resent),
            "learned_p50_s": _quantile(latencies, 0.5),
            "learned_p99_s": _quantile(latencies, 0.99),
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 2)


def _corrupt(data: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    mid = len(data) // 2
    return data[:mid] + bytes(rng.randrange(256) for _ in range(1024)) + data[mid + 1024 :]
