"""The embedder process (``flava embedder``): query embeddings from published models.

It answers ``POST /embed``: the API adds a :class:`contract.wire.QueryRequest` (the clips
themselves) to ``{p}:queries`` and waits on ``{p}:reply:{request}``; an embedder of the
consumer group ``embedders`` reads it, embeds the clips with the newest published model or
the pinned version, pushes one :class:`contract.wire.QueryReply` (with a TTL), then acks and
deletes the entry. Nothing it embeds is trained on, stored as a clip's embedding, or seen by
the drift and forgetting monitors: it holds no learner, only published weights
(worker/models.py), so queries never slow the learner's loop (they share its cores only: one
torch thread by default).

Dynamic batching: after the first request arrives it waits at most ``max_wait_ms`` for more,
up to ``max_batch`` clips, and embeds the clips of all requests for one version in one model
call. Hot reload: the newest listed version is looked up every ``reload_check_s`` and loaded
before the next batch; pinned versions load on demand (at most ``max_loaded`` held, LRU).
Several embedders may run; one that dies leaves its requests pending, and another takes
over those still worth answering after ``claim_idle_ms``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
import torch
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from contract import wire
from contract.faults import lost_group
from worker import telemetry
from worker.core.media import Clip, MediaError, decode_clip
from worker.models import LoadedModel, load_model
from worker.queue import transient
from worker.settings import EmbedderSettings

log = logging.getLogger(__name__)


class VersionUnknown(LookupError):
    """The version asked for is not published (or was pruned)."""


@dataclass(frozen=True)
class Query:
    entry_id: str
    request: wire.QueryRequest


class ModelCache:
    """The versions an embedder holds: the newest published one and recently pinned ones."""

    def __init__(self, settings: EmbedderSettings, client: redis.Redis, keys: wire.Keys):
        self.settings = settings
        self.redis = client
        self.keys = keys
        self.newest: str | None = None
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._checked = 0.0

    def refresh(self, force: bool = False) -> str | None:
        """Look up the newest listed version (every ``reload_check_s``) and load it if new."""
        if not force and time.monotonic() - self._checked < self.settings.reload_check_s:
            return self.newest
        self._checked = time.monotonic()
        newest = wire.newest_version(self.redis.hkeys(self.keys.models))
        if newest is not None and newest != self.newest:
            self.get(newest)
            log.info("hot reload: newest published model is now %s", newest)
            self.newest = newest
        return self.newest

    def get(self, version: str) -> LoadedModel:
        if version in self.loaded:
            self.loaded.move_to_end(version)
            return self.loaded[version]
        try:
            model = load_model(self.settings.models_dir, version, self.settings.device)
        except FileNotFoundError as exc:
            raise VersionUnknown(f"model {version} is not published (or was pruned)") from exc
        self.loaded[version] = model
        while len(self.loaded) > max(1, self.settings.max_loaded):
            self.loaded.popitem(last=False)
        telemetry.EMBEDDER_MODELS.set(len(self.loaded))
        return model


class QueryStream:
    """The embedder's side of the query contract: read, take over, reply, ack."""

    def __init__(self, client: redis.Redis, keys: wire.Keys, name: str):
        self.redis = client
        self.keys = keys
        self.name = name

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.queries, wire.QUERY_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, block_ms: int) -> list[Query]:
        read: Any = self.redis.xreadgroup(
            wire.QUERY_GROUP, self.name, {self.keys.queries: ">"}, count=count, block=block_ms
        )
        return self._parse(read[0][1] if read else [])

    def claim_stale(self, min_idle_ms: int, count: int) -> list[Query]:
        """Requests another embedder took and left (it died), and deleted ones' leftovers."""
        got: Any = self.redis.xautoclaim(
            self.keys.queries, wire.QUERY_GROUP, self.name, min_idle_ms, "0-0", count=count
        )
        gone = [i for i in (got[2] if len(got) > 2 else [])]
        if gone:
            self.redis.xack(self.keys.queries, wire.QUERY_GROUP, *gone)
        return self._parse(got[1])

    def _parse(self, entries: list) -> list[Query]:
        queries = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                queries.append(Query(eid, wire.QueryRequest.from_fields(fields or {})))
            except (KeyError, ValueError) as exc:
                log.warning("malformed query entry %s dropped: %r", eid, exc)
                self.finish([Query(eid, wire.QueryRequest("", []))], {}, 0)
        return queries

    def finish(self, queries: list[Query], replies: dict[str, wire.QueryReply], ttl: int) -> None:
        """Push each reply (with a TTL), then ack and delete the requests, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for request_id, reply in replies.items():
            pipe.rpush(self.keys.reply(request_id), reply.encode())
            pipe.expire(self.keys.reply(request_id), ttl)
        ids = [q.entry_id for q in queries]
        if ids:
            pipe.xack(self.keys.queries, wire.QUERY_GROUP, *ids)
            pipe.xdel(self.keys.queries, *ids)
        pipe.execute()

    def heartbeat(self) -> None:
        self.redis.zadd(self.keys.embedders, {self.name: time.time()})

    def leave(self) -> None:
        self.redis.zrem(self.keys.embedders, self.name)


class Embedder:
    """Serves query requests until ``stop`` is set; ``serve_once`` is one batch."""

    def __init__(self, settings: EmbedderSettings, client: redis.Redis):
        self.settings = settings
        keys = wire.Keys(settings.key_prefix)
        self.stream = QueryStream(client, keys, settings.name)
        self.models = ModelCache(settings, client, keys)
        self.decoders = ThreadPoolExecutor(max(1, settings.decode_threads), "decode")
        self.calls = 0  # model calls made: batching shows as fewer calls than requests
        self._beat = 0.0

    def start(self) -> None:
        torch.set_num_threads(max(1, self.settings.threads))
        self.stream.ensure_group()
        self.stream.heartbeat()
        self.models.refresh(force=True)

    def run(self, stop: threading.Event) -> None:
        self._retry(self.start, stop)
        try:
            while not stop.is_set():
                self._retry(self.serve_once, stop)
        finally:
            self.decoders.shutdown()
            self._retry(self.stream.leave, stop)
            log.info("embedder %s stopped after %d model calls", self.settings.name, self.calls)

    def serve_once(self) -> int:
        """Collect a batch of requests, answer them; returns how many were answered."""
        self._heartbeat()
        self.models.refresh()
        queries = self.collect()
        if queries:
            self.serve(queries)
        return len(queries)

    def collect(self) -> list[Query]:
        """The first requests waiting (blocking ``block_ms``), then more for ``max_wait_ms``."""
        s = self.settings
        queries = self.stream.read(s.max_batch, s.block_ms)
        if not queries:
            return self.stream.claim_stale(s.claim_idle_ms, s.max_batch)
        until = time.monotonic() + s.max_wait_ms / 1000
        while _clips(queries) < s.max_batch and (left := until - time.monotonic()) > 0:
            queries += self.stream.read(s.max_batch - _clips(queries), max(1, int(left * 1000)))
        return queries

    def serve(self, queries: list[Query]) -> None:
        """Answer each live request; ack and delete all of them."""
        now = time.time()
        live = [q for q in queries if q.request.deadline > now and q.request.request_id]
        telemetry.QUERY_REQUESTS.labels("expired").inc(len(queries) - len(live))
        replies: dict[str, wire.QueryReply] = {}
        for version, group in self._by_version(live, replies).items():
            replies.update(self._answer(version, group))
        self.stream.finish(queries, replies, self.settings.reply_ttl_s)

    def _by_version(
        self, queries: list[Query], replies: dict[str, wire.QueryReply]
    ) -> dict[str, list[Query]]:
        """Requests grouped by the version that answers them (pinned, else the newest)."""
        groups: dict[str, list[Query]] = {}
        for q in queries:
            version = q.request.version or self.models.newest
            if version is None:
                replies[q.request.request_id] = self._error("no_model", "no model published yet")
                continue
            groups.setdefault(version, []).append(q)
        return groups

    def _answer(self, version: str, queries: list[Query]) -> dict[str, wire.QueryReply]:
        try:
            loaded = self.models.get(version)
        except VersionUnknown as exc:
            return {q.request.request_id: self._error("version_unknown", str(exc)) for q in queries}
        replies, decoded = {}, []
        for q in queries:
            clips = self._decode(q.request.clips, loaded)
            if isinstance(clips, wire.QueryReply):
                replies[q.request.request_id] = clips
            else:
                decoded.append((q, clips))
        replies.update(self._embed(loaded, decoded))
        return replies

    def _decode(self, blobs: list[bytes], loaded: LoadedModel) -> list[Clip] | wire.QueryReply:
        """The clips of one request, or the error reply naming the first that fails."""
        results = list(self.decoders.map(lambda b: _decode(b, loaded), blobs))
        for index, result in enumerate(results):
            if isinstance(result, str):
                return self._error("undecodable", f"clip {index}: {result}", index)
        return [r for r in results if isinstance(r, Clip)]

    def _embed(
        self, loaded: LoadedModel, decoded: list[tuple[Query, list[Clip]]]
    ) -> dict[str, wire.QueryReply]:
        """Embed the clips of every request in model calls of at most ``max_batch`` clips."""
        flat = [(i, clip) for i, (_, clips) in enumerate(decoded) for clip in clips]
        rows: list[list[tuple[list[float], list[float]]]] = [[] for _ in decoded]
        first_call: dict[int, tuple[int, int]] = {}  # request -> (call, clips in it)
        size = max(1, self.settings.max_batch)
        for start in range(0, len(flat), size):
            chunk = flat[start : start + size]
            emb_a, emb_v = self._call(loaded, [c for _, c in chunk])
            for (i, _), a, v in zip(chunk, emb_a.tolist(), emb_v.tolist(), strict=True):
                rows[i].append((a, v))
                first_call.setdefault(i, (self.calls, len(chunk)))
        return {
            q.request.request_id: self._ok(loaded, rows[i], *first_call.get(i, (0, 0)))
            for i, (q, _) in enumerate(decoded)
        }

    def _call(self, loaded: LoadedModel, clips: list[Clip]) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        emb_a, emb_v = embed_clips(loaded, clips, self.settings.device)
        self.calls += 1
        telemetry.QUERY_SECONDS.observe(time.perf_counter() - started)
        telemetry.QUERY_BATCH_CLIPS.observe(len(clips))
        return emb_a, emb_v

    def _ok(self, loaded: LoadedModel, rows: list, call: int, clips: int) -> wire.QueryReply:
        telemetry.QUERY_REQUESTS.labels("ok").inc()
        card = loaded.card
        return wire.QueryReply(
            status="ok",
            model_version=card.version,
            step=card.step,
            method=card.method,
            audio=[a for a, _ in rows],
            video=[v for _, v in rows],
            served_by=self.settings.name,
            batch_clips=clips,
            call=call,
        )

    def _error(self, code: str, reason: str, index: int = -1) -> wire.QueryReply:
        telemetry.QUERY_REQUESTS.labels(code).inc()
        return wire.QueryReply(
            "error", code=code, reason=reason, index=index, served_by=self.settings.name
        )

    def _heartbeat(self) -> None:
        if time.monotonic() - self._beat >= self.settings.heartbeat_s:
            self.stream.heartbeat()
            self._beat = time.monotonic()

    def _retry(self, fn, stop: threading.Event) -> None:
        """Call ``fn``; back off on a Redis outage (0.1 s doubling to 5 s); NOGROUP recreates."""
        delay = 0.1
        while not stop.is_set():
            try:
                fn()
                return
            except RedisError as exc:
                if lost_group(exc):
                    self.stream.ensure_group()
                elif not transient(exc):
                    raise
                log.warning("redis unavailable (%s); retrying in %.1f s", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)


def embed_clips(
    loaded: LoadedModel, clips: list[Clip], device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (B, D), v (B, D)) float32 on the CPU: one no-grad call of the published model."""
    fbank = torch.stack([c.fbank for c in clips]).to(device)
    frames = torch.stack([c.frames for c in clips]).to(device)
    with torch.inference_mode():
        emb_a, emb_v = loaded.model.embed(fbank, frames)
    return emb_a.float().cpu(), emb_v.float().cpu()


def _decode(blob: bytes, loaded: LoadedModel) -> Clip | str:
    try:
        return decode_clip(blob, loaded.media)
    except MediaError as exc:
        return f"{type(exc).__name__}: {exc}"


def _clips(queries: list[Query]) -> int:
    return sum(len(q.request.clips) for q in queries)


def run_embedder(settings: EmbedderSettings | None = None) -> None:
    """The ``flava embedder`` process: SIGTERM/SIGINT finish the batch in hand, then exit."""
    settings = settings or EmbedderSettings()  # type: ignore[call-arg]  # from FLAVA_* env
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5)
    log.info("embedder %s: models in %s", settings.name, settings.models_dir)
    try:
        Embedder(settings, client).run(stop)
    finally:
        client.close()
