"""The HTTP API: POST /ingest, GET and POST /embed, GET /models, DELETE /clips/{id}, health,
readiness and metrics.

It never imports torch: it validates uploads with PyAV headers and talks to Redis through
:mod:`contract.wire`. Build it with :func:`create_app`; pass a Redis client in tests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.datastructures import FormData, UploadFile

from contract import wire
from contract.faults import unavailable
from contract.index import input_path
from contract.redact import install as redact_logs
from contract.windows import window_starts
from service import manage, metrics, queries, schemas, search, uploads
from service.probe import ProbeError, probe_clip
from service.settings import ApiSettings

log = logging.getLogger(__name__)

# A pooled connection that Redis closed (a restart) fails once; reconnect and resend once, so
# the first request after a restart is not a 503. A timeout is not retried (it may have run).
RECONNECT_ONCE = Retry(ExponentialBackoff(cap=0.25, base=0.05), 1, (RedisConnectionError,))
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def upload_openapi(form_fields: dict) -> dict:
    """The request body of a route that reads its upload by hand (size cap, raw or multipart)."""
    form = {"type": "object", "properties": form_fields, "required": ["file"]}
    content = {"video/mp4": _BINARY, "application/octet-stream": _BINARY}
    return {
        "requestBody": {
            "required": True,
            "content": {**content, "multipart/form-data": {"schema": form}},
        }
    }


INGEST_OPENAPI = upload_openapi(
    {"file": {"type": "string", "format": "binary"}, "task": {"type": "string"}}
)
SEARCH_OPENAPI = upload_openapi({"file": {"type": "string", "format": "binary"}})
# one clip raw or multipart, or several `file` parts
QUERY_OPENAPI = upload_openapi(
    {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}
)


class ApiState:
    """What every route needs: settings, the Redis client, key names, the ingest script."""

    def __init__(self, settings: ApiSettings, client: aioredis.Redis):
        self.settings = settings
        self.redis = client
        self.keys = wire.Keys(settings.key_prefix)
        self.ingest_script = client.register_script(wire.INGEST_SCRIPT)
        self.delete_script = client.register_script(wire.DELETE_SCRIPT)
        self.ingest_upload_script = client.register_script(wire.INGEST_UPLOAD_SCRIPT)
        self.indexes = search.IndexCache(settings.index_dir)


# Dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in the thread pool,
# two thread hops per request for nothing (a sixth of /ingest's CPU at 1 MB).
async def get_state(request: Request) -> ApiState:
    return request.app.state.api


State = Annotated[ApiState, Depends(get_state)]


# declares the bearer scheme in the OpenAPI schema (each route that needs it says so); the
# check is require_token's: a missing header or another scheme reads as no token
BEARER = HTTPBearer(auto_error=False, description="FLAVA_API_TOKEN, when the API has one")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


async def require_token(state: State, credentials: Credentials) -> None:
    """401 unless the bearer token matches FLAVA_API_TOKEN (when one is configured)."""
    token = state.settings.api_token
    if not token:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        detail = {"code": "unauthorized", "reason": "missing or wrong bearer token"}
        raise HTTPException(401, detail, {"WWW-Authenticate": "Bearer"})


async def require_metrics_token(state: State, credentials: Credentials) -> None:
    """/metrics: the bearer token too when FLAVA_METRICS_AUTH is on (off by default)."""
    if state.settings.metrics_auth:
        await require_token(state, credentials)


Authorized = Annotated[None, Depends(require_token)]
Version = Annotated[str | None, Query(pattern=wire.VERSION_PATTERN.pattern)]


def create_app(settings: ApiSettings | None = None, client: aioredis.Redis | None = None):
    """Build the FastAPI app; it owns (and closes) the Redis client only if it made it."""
    settings = settings or ApiSettings()
    own_client = client is None
    client = client or aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=2, retry=RECONNECT_ONCE
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        metrics.process_exit()
        if own_client:
            await client.aclose()

    redact_logs()  # `flava serve --workers N` processes build the app without the CLI
    # FLAVA_DOCS_AUTH: the schema and the docs need the token (the default routes are off)
    closed = settings.docs_auth
    app = FastAPI(
        title="flava-stream",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None if closed else "/openapi.json",
        docs_url=None if closed else "/docs",
        redoc_url=None if closed else "/redoc",
    )
    if settings.docs_auth:
        _add_docs_behind_token(app)
    app.state.api = ApiState(settings, client)
    app.add_middleware(metrics.CountResponses)  # answers by status class, for the 5xx alert
    metrics.BACKLOG_LIMIT.set(settings.max_backlog)
    app.add_exception_handler(RedisError, _redis_error)
    _add_routes(app)
    return app


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    """503 + Retry-After for Redis saying "not now" (down, OOM, READONLY, BUSY, LOADING);
    any other Redis error is re-raised: a bug, answered 500."""
    why = unavailable(exc)
    if why is None:
        raise exc
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        metrics.REDIS_UP.set(0)
    metrics.REDIS_UNAVAILABLE.labels(why.code).inc()
    retry = request.app.state.api.settings.retry_after_s
    log.warning("redis unavailable (%s): %s", why.code, exc)
    reason = f"queue unavailable: {why.reason}; retry in {retry} s"
    return JSONResponse(
        {"detail": {"code": why.code, "reason": reason}},
        status_code=503,
        headers={"Retry-After": str(retry)},
    )


def _add_docs_behind_token(app: FastAPI) -> None:
    """GET /openapi.json and /docs with the bearer token; the docs page carries the schema
    (Swagger UI's ``spec``), so it makes no second, token-less request for it."""

    async def openapi(_: Authorized) -> JSONResponse:
        return JSONResponse(app.openapi())

    async def docs(_: Authorized) -> HTMLResponse:
        spec = {"spec": app.openapi()}
        return get_swagger_ui_html(openapi_url="", title=app.title, swagger_ui_parameters=spec)

    app.get("/openapi.json", include_in_schema=False)(openapi)
    app.get("/docs", include_in_schema=False)(docs)


ERROR_TEXT = {
    400: "the body is empty or malformed",
    401: "missing or wrong bearer token (FLAVA_API_TOKEN)",
    404: "not found: `code` says what",
    408: "the body or the headers came too slowly",
    409: "not possible in the current state: `code` says why",
    413: "the body is too large",
    415: "not a readable clip, or a content type or format refused",
    422: "a parameter out of its pattern or bounds, or a clip refused: `code` says why",
    429: "the backlog is full; retry after Retry-After",
    503: "Redis or the embedders cannot answer now; retry after Retry-After",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses: ErrorBody (422: InvalidBody)."""
    return {
        status: {
            "model": schemas.InvalidBody if status == 422 else schemas.ErrorBody,
            "description": ERROR_TEXT[status],
        }
        for status in statuses
    }


def answers(model: Any, *statuses: int, text: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses``: more statuses answered with a route's own model."""
    return {status: {"model": model, "description": text} for status in statuses}


UPLOAD_ERRORS = (400, 401, 408, 413, 415, 422, 503)  # a body read and probed, then Redis
METRICS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}
}


def _add_routes(app: FastAPI) -> None:
    s = schemas
    app.post(
        "/ingest",
        status_code=202,
        response_model=s.Ingested,
        responses=answers(s.Ingested, 200, text="duplicate: these bytes are already held")
        | errors(*UPLOAD_ERRORS, 429),
        openapi_extra=INGEST_OPENAPI,
    )(ingest)
    app.get(
        "/embed",
        response_model=s.ClipAnswer,
        responses=answers(s.ClipAnswer, 202, 404, 410, text="pending; unknown; dead or reset")
        | errors(401, 422, 503),
    )(embed)
    app.post(
        "/embed",
        response_model=s.QueryAnswer,
        responses=errors(*UPLOAD_ERRORS, 404),
        openapi_extra=QUERY_OPENAPI,
    )(embed_query)
    app.get("/models", response_model=s.ModelList, responses=errors(401, 503))(models)
    app.delete(
        "/clips/{clip_id}",
        response_model=s.ClipDeleted | s.UploadDeleted,
        responses=errors(401, 404, 422, 503),
    )(delete_clip)
    search_errors = errors(401, 404, 422, 503)
    app.get("/search", response_model=s.SearchAnswer, responses=search_errors)(search_by_clip)
    app.post(
        "/search",
        response_model=s.SearchAnswer,
        responses=errors(*UPLOAD_ERRORS, 404),
        openapi_extra=SEARCH_OPENAPI,
    )(search_by_upload)
    app.get("/healthz", response_model=s.Health)(healthz)
    not_ready: dict[int | str, dict[str, Any]] = {
        503: {"model": s.Readiness | s.ErrorBody, "description": "not ready"}
    }
    app.get("/readyz", response_model=s.Readiness, responses=not_ready)(readyz)
    app.get(
        "/metrics",
        dependencies=[Depends(require_metrics_token)],
        response_class=Response,
        responses=METRICS_TEXT | errors(401),
    )(metrics_endpoint)
    _add_management_routes(app)


def _add_management_routes(app: FastAPI) -> None:
    """What the learner does, and the operator's levers (docs/operations.md)."""
    s, state_errors = schemas, errors(401, 404, 503)
    app.get("/model", response_model=s.ModelState, responses=state_errors)(model_state)
    app.get("/monitor", response_model=dict[str, Any], responses=state_errors)(monitor_summary)
    app.get("/dead", response_model=s.DeadLetters, responses=errors(401, 422, 503))(dead_letters)
    app.post(
        "/dead/{clip_id}/retry",
        status_code=202,
        response_model=s.Requeued,
        responses=errors(401, 404, 409, 422, 429, 503),
    )(retry_dead)
    lever_errors = errors(401, 503)
    for path, route in (("/model/pause", pause_model), ("/model/resume", resume_model)):
        app.post(path, status_code=202, response_model=s.PauseAnswer, responses=lever_errors)(route)
    app.post(
        "/model/rollback",
        status_code=202,
        response_model=s.RollbackAnswer,
        responses=errors(401, 404, 409, 422, 503),
    )(rollback_model)


async def ingest(
    request: Request,
    state: State,
    _: Authorized,
    task: Annotated[str | None, Query(max_length=64, pattern=wire.TASK_PATTERN.pattern)] = None,
    purpose: Annotated[str, Query(pattern="^(train|probe)$")] = "train",
) -> JSONResponse:
    """Accept one clip or upload (raw body, or multipart `file` up to FLAVA_MAX_BODY_BYTES);
    202 with its clip_id once queued. One longer than an example is cut into windows."""
    started = time.perf_counter()
    received = None
    try:
        received, content_type, form_task = await _read_upload(request, state.settings)
        task = task or form_task or ""
        limits = state.settings.probe_limits()
        probe = await anyio.to_thread.run_sync(probe_clip, received.source, limits)
        starts = window_starts(probe.duration_s, *state.settings.window_grid())
        if starts and probe.duration_s is not None:  # windows need a known length
            meta = (content_type, task, purpose)
            answer = await _enqueue_windows(state, received, probe.duration_s, starts, *meta)
        else:
            data = _one_example(received, state.settings)
            answer = await _enqueue(state, received.sha256, data, content_type, task, purpose)
    except ProbeError as exc:
        metrics.INGEST_REQUESTS.labels(exc.code).inc()
        _log_refused(received, exc)
        raise HTTPException(exc.status, {"code": exc.code, "reason": str(exc)}) from exc
    finally:
        if received is not None:
            received.discard()  # a partial file left: not admitted
    metrics.INGEST_SECONDS.observe(time.perf_counter() - started)
    return answer


def _log_ingest(clip_id: str, outcome: str, size: int, task: str, purpose: str, **more) -> None:
    """One event per ingest answer, with the clip's id as a field (contract/logs.py)."""
    fields = dict(clip_id=clip_id, outcome=outcome, size=size, task=task, purpose=purpose)
    level = logging.WARNING if outcome.startswith("full") else logging.INFO  # backlog full
    log.log(level, "ingest %s: %s", clip_id[:12], outcome, extra={**fields, **more})


def _log_refused(received: uploads.Received | None, exc: ProbeError) -> None:
    """A refused body read whole has a clip id (its sha256); one cut off earlier has none."""
    fields: dict[str, object] = {"outcome": exc.code, "reason": str(exc)}
    if received is not None:
        fields.update(clip_id=received.sha256, size=received.size)
    log.info("ingest refused (%s)", exc.code, extra=fields)


async def _read_upload(
    request: Request, settings: ApiSettings
) -> tuple[uploads.Received, str, str]:
    """-> (the body, content type, task from a form field); 4xx on anything unusable."""
    content_type = request.headers.get("content-type", "application/octet-stream")
    if content_type.startswith("multipart/form-data"):
        form = await uploads.receive_form(request, settings, settings.max_body_bytes)
        try:
            return await _from_multipart(form)
        finally:
            await form.close()
    if not content_type.startswith(queries.RAW_TYPES):
        raise ProbeError("unsupported_content_type", f"content type {content_type!r}", 415)
    received = await uploads.receive_raw(request, settings)
    if not received.size:
        raise ProbeError("empty_body", "the request body is empty", 400)
    return received, content_type, ""


async def _from_multipart(form: FormData) -> tuple[uploads.Received, str, str]:
    """The `file` part (its content type checked as a raw body's) and the `task` field; the
    part's bytes are read once, from the spooled file."""
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ProbeError("no_file", "multipart upload has no 'file' part", 422)
    content_type = upload.content_type or "application/octet-stream"
    if not content_type.startswith(queries.RAW_TYPES):
        reason = f"the file part's content type {content_type!r}"
        raise ProbeError("unsupported_content_type", reason, 415)
    task = form.get("task")
    task = task if isinstance(task, str) else ""
    if task and not wire.TASK_PATTERN.fullmatch(task):
        raise ProbeError("bad_task", "task must match [A-Za-z0-9_.:-]{1,64}", 422)
    data = await upload.read()
    if not data:
        raise ProbeError("empty_body", "the uploaded file is empty", 400)
    digest = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
    return uploads.Received(digest, len(data), data, None), content_type, task


def _one_example(received: uploads.Received, settings: ApiSettings) -> bytes:
    """The bytes of a clip that is one example (it travels through Redis): 413 if it came in
    larger than a clip may be."""
    if received.data is None:
        reason = (
            f"a clip of one example ({received.size} bytes) travels through Redis: at most "
            f"{settings.max_body_bytes} bytes (FLAVA_MAX_BODY_BYTES); only uploads longer than "
            f"one example may be larger"
        )
        raise ProbeError("too_large", reason, 413)
    return received.data


async def _enqueue_windows(
    state: ApiState,
    received: uploads.Received,
    duration_s: float,
    starts: list[float],
    content_type: str,
    task: str,
    purpose: str,
) -> JSONResponse:
    """Store the upload's file, then queue its windows (an upload is admitted whole)."""
    span, stride = state.settings.window_grid()
    upload = wire.Upload(
        received.sha256,
        received.size,
        content_type,
        duration_s,
        span,
        stride,
        starts,
        task,
        purpose,
    )
    path = await anyio.to_thread.run_sync(uploads.store, received, state.settings.blob_dir)
    outcome, detail, epoch = await uploads.enqueue_upload(state, upload, path)
    metrics.REDIS_UP.set(1)
    metrics.INGEST_REQUESTS.labels(outcome).inc()
    _log_ingest(upload.upload_id, outcome, received.size, task, purpose, windows=len(starts))
    if outcome == "full":
        raise _backlog_full(outcome, int(detail), received.size, state.settings)
    body = {"clip_id": upload.upload_id, "task": task, "purpose": purpose, "windows": len(starts)}
    body.update(span_s=span, stride_s=stride, duration_s=duration_s)
    if epoch:
        body["queue_epoch"] = wire.QueueEpoch.decode(epoch).id
    if outcome == "duplicate":
        return JSONResponse({**body, "status": "duplicate", "state": detail}, status_code=200)
    metrics.INGEST_BYTES.inc(received.size)
    return JSONResponse({**body, "status": "queued"}, status_code=202)


async def _enqueue(
    state: ApiState, clip_id: str, data: bytes, content_type: str, task: str, purpose: str
) -> JSONResponse:
    entry = wire.ClipEntry(clip_id, len(data), content_type, task, purpose)
    script_keys, args = wire.ingest_call(state.keys, entry, data, state.settings.ingest_limits())
    outcome, detail, epoch = (x.decode() for x in await state.ingest_script(script_keys, args))
    metrics.REDIS_UP.set(1)
    metrics.INGEST_REQUESTS.labels(outcome).inc()
    _log_ingest(clip_id, outcome, len(data), task, purpose)
    if outcome in ("full", "full_bytes"):
        raise _backlog_full(outcome, int(detail), len(data), state.settings)
    body = {"clip_id": clip_id, "task": task, "purpose": purpose}
    if epoch:  # "" only for a duplicate queued before queue epochs existed
        body["queue_epoch"] = wire.QueueEpoch.decode(epoch).id
    if outcome == "duplicate":
        return JSONResponse({**body, "status": "duplicate", "state": detail}, status_code=200)
    metrics.INGEST_BYTES.inc(len(data))
    return JSONResponse({**body, "status": "queued", "entry_id": detail}, status_code=202)


def _backlog_full(outcome: str, backlog: int, size: int, s: ApiSettings) -> HTTPException:
    """429 + Retry-After: too many clips, or too many bytes, accepted and not yet acked."""
    if outcome == "full":
        metrics.BACKLOG.set(backlog)
        detail = {
            "code": "backlog_full",
            "reason": f"{backlog} clips waiting (limit {s.max_backlog})",
        }
    else:
        reason = (
            f"{backlog} bytes waiting; this clip's {size} would pass the limit "
            f"of {s.max_backlog_bytes} (FLAVA_MAX_BACKLOG_BYTES)"
        )
        detail = {"code": "backlog_bytes_full", "reason": reason}
    return HTTPException(429, detail, {"Retry-After": str(s.retry_after_s)})


ANY_CLIP_ID = f"({wire.CLIP_ID_PATTERN.pattern})|({wire.WINDOW_ID_PATTERN.pattern})"


async def embed(
    state: State,
    _: Authorized,
    clip_id: Annotated[str, Query(pattern=ANY_CLIP_ID)],
    epoch: Annotated[str | None, Query(pattern=wire.EPOCH_PATTERN.pattern)] = None,
    version: Version = None,
    windows: bool = False,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=uploads.PAGE_MAX)] = 100,
) -> JSONResponse:
    """A clip's embeddings (200), or pending (202), unknown (404), dead or lost in a reset (410).

    Pass `epoch` (the `queue_epoch` of the 202) to learn whether an unknown clip was lost
    because Redis lost its data after accepting it. With `version`, 404 unless that version
    made the clip's embedding (each clip has the one of the version that processed it).

    An upload cut into windows answers its progress and `pooled`, the mean embedding of the
    windows one version embedded (`version`, or the one that embedded most); `windows=true`
    adds a page (`offset`, `limit`) of per-window embeddings; `clip_id={upload}:{i}` is
    window i alone."""
    started = time.perf_counter()
    pipe = state.redis.pipeline(transaction=False)
    pipe.hgetall(state.keys.clip(clip_id))
    pipe.hgetall(state.keys.embedding(clip_id))
    clip, emb = await pipe.execute()
    if clip and b"windows" in clip:
        page = (windows, offset, limit)
        answer = await uploads.upload_answer(state, clip_id, clip, version, *page)
    elif clip:
        answer = _embed_answer(clip_id, clip, emb, version)
        if answer.status_code == 404 and version is not None:  # another version made it
            answer = await _indexed_answer(state, clip_id, clip, version) or answer
    else:
        answer = _unknown_answer(clip_id, epoch, await _queue_epoch(state))
    metrics.EMBED_REQUESTS.labels(str(answer.status_code)).inc()
    metrics.EMBED_SECONDS.observe(time.perf_counter() - started)
    return answer


async def _queue_epoch(state: ApiState) -> wire.QueueEpoch:
    """The queue's epoch; created here (SET NX) if this Redis has none: fresh, or reset."""
    value = await state.redis.get(state.keys.epoch)
    if value is None:
        candidate = wire.QueueEpoch.new().encode()
        earlier = await state.redis.set(state.keys.epoch, candidate, nx=True, get=True)
        value = earlier if isinstance(earlier, bytes) else candidate  # None: ours was set
    return wire.QueueEpoch.decode(value)


def _unknown_answer(clip_id: str, given: str | None, current: wire.QueueEpoch) -> JSONResponse:
    """404 for a clip this queue does not hold; 410 when the client's epoch is an older queue's."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(current.created_at))
    reset = None if given is None else given != current.id
    body = {"clip_id": clip_id, "queue_epoch": current.id, "queue_created_at": current.created_at}
    body["queue_reset"] = reset
    if reset:
        reason = f"the queue was reset at {since} after this clip was accepted; send it again"
        return JSONResponse({**body, "status": "reset", "reason": reason}, status_code=410)
    reason = f"not in this queue (epoch {current.id}, created {since}); " + _UNKNOWN_HINT[reset]
    return JSONResponse({**body, "status": "unknown", "reason": reason}, status_code=404)


_UNKNOWN_HINT = {  # keyed by queue_reset: None (no epoch given) or False (the same epoch)
    None: "a clip accepted before then was lost when the queue was reset: send it again",
    False: "the queue was not reset since your 202 (see docs/durability.md for the window "
    "a Redis crash can lose)",
}


def _embed_answer(clip_id: str, clip: dict, emb: dict, version: str | None) -> JSONResponse:
    state = clip[b"state"].decode()
    if state == "dead":
        reason = clip.get(b"reason", b"").decode()
        return JSONResponse({"clip_id": clip_id, "status": "dead", "reason": reason}, 410)
    if not emb:
        return JSONResponse({"clip_id": clip_id, "status": "pending", "state": state}, 202)
    e = wire.Embedding.from_fields(emb)
    if version is not None and str(wire.ModelVersion.parse(version)) != e.model_version:
        return _other_version(clip_id, e.model_version, version)
    return JSONResponse(
        {
            "clip_id": clip_id,
            "status": "ready",
            "state": state,
            "model_version": e.model_version,
            "step": e.step,
            "method": e.method,
            "written_at": e.written_at,
            "dim": len(e.audio),
            "audio": e.audio,
            "video": e.video,
        }
    )


async def _indexed_answer(
    state: ApiState, clip_id: str, clip: dict, version: str
) -> JSONResponse | None:
    """The clip's embedding by ``version`` from that version's search index (`flava reembed`
    embedded the kept clips with it), unit-normalised as indexes keep them; None if no such
    index holds the clip."""
    try:
        index = await state.indexes.get(version)
    except HTTPException:
        return None
    audio, video = index.vector(clip_id, "audio"), index.vector(clip_id, "video")
    if audio is None or video is None:
        return None
    body = {
        "clip_id": clip_id,
        "status": "ready",
        "state": clip[b"state"].decode(),
        "model_version": index.version,
        "source": "index",
        "dim": len(audio),
        "audio": audio.tolist(),
        "video": video.tolist(),
    }
    return JSONResponse(body)


def _other_version(clip_id: str, made_by: str, asked: str) -> JSONResponse:
    reason = (
        f"clip {clip_id[:12]} was embedded by version {made_by}, not {asked}: a clip keeps the "
        f"embedding of the version that processed it (docs/versions.md); POST its bytes to "
        f"/embed?version={asked} to embed it with {asked}"
    )
    body = {"clip_id": clip_id, "status": "other_version", "model_version": made_by}
    return JSONResponse({**body, "reason": reason}, status_code=404)


async def embed_query(request: Request, state: State, _: Authorized, version: Version = None):
    """Embed one clip (raw body or multipart `file`) or up to 32 (`file` parts) without learning
    from them, with the newest published model or the pinned `version`."""
    try:
        clips = await queries.read_clips(request, state.settings)
        limits = state.settings.probe_limits()
        await anyio.to_thread.run_sync(queries.probe_all, clips, limits)
    except ProbeError as exc:
        raise HTTPException(exc.status, {"code": exc.code, "reason": str(exc)}) from exc
    await queries.check_version(state, version)
    await queries.check_capacity(state)
    started = time.perf_counter()
    reply = await queries.ask(state, clips, version or "")
    metrics.QUERY_SECONDS.observe(time.perf_counter() - started)
    return queries.answer(reply)


async def models(state: State, _: Authorized) -> dict:
    """The published models a query can pin (version, generation, step, time, method)."""
    return await queries.list_models(state)


async def delete_clip(
    state: State,
    _: Authorized,
    clip_id: Annotated[str, Path(pattern=wire.CLIP_ID_PATTERN.pattern)],
) -> JSONResponse:
    """Delete a clip's bytes, kept inputs, embedding, state and search index entries (and its
    queue entry if still queued); what the model already learned from it stays in the
    weights. An upload goes with all its windows and its file."""
    upload = await state.redis.hgetall(state.keys.clip(clip_id))
    windows = int(upload.get(b"windows", 0))
    clip_ids = [wire.window_id(clip_id, i) for i in range(windows)] or [clip_id]
    await search.bury(state.redis, state.keys, clip_ids)  # out of search before it is gone
    await _remove_inputs(state, clip_ids)
    if windows:
        answer = await uploads.delete_upload(state, clip_id, upload)
    else:
        answer = await queries.delete_clip(state, clip_id)
    if answer.status_code == 404:
        await search.unbury(state.redis, state.keys, clip_ids)
    await search.prune_tombstones(state.redis, state.keys, state.settings.index_dir)
    return answer


async def _remove_inputs(state: ApiState, clip_ids: list[str]) -> None:
    """The clips' kept inputs (worker/inputs.py): a deleted clip is not re-embedded again."""

    def remove() -> None:
        for cid in clip_ids:
            input_path(state.settings.inputs_dir, cid).unlink(missing_ok=True)

    await anyio.to_thread.run_sync(remove)


async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


async def readyz(state: State) -> JSONResponse:
    """Readiness: Redis answers and some worker sent a heartbeat recently.

    Also says whether learning is durable: while the worker cannot write checkpoints (a
    full disk) it keeps serving embeddings but acks nothing; ``checkpoint_error`` says why
    and ``unacked`` how many clips wait (the API stays ready: accepting clips loses none)."""
    await state.redis.ping()
    metrics.REDIS_UP.set(1)
    newest = await state.redis.zrevrange(state.keys.workers, 0, 0, withscores=True)
    model = await state.redis.hmget(state.keys.model, ["checkpoint_error", "unacked", "version"])
    age = time.time() - float(newest[0][1]) if newest else None
    ready = age is not None and age <= state.settings.heartbeat_max_age_s
    error, unacked, version = (v.decode() if isinstance(v, bytes) else v for v in model)
    body = {
        "redis": "ok",
        "worker_heartbeat_age_s": age,
        "ready": ready,
        "model_version": version,
        "durable": not error,
        "checkpoint_error": error or None,
        "unacked": int(unacked) if unacked else 0,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics_endpoint(state: State) -> Response:
    """Prometheus metrics of this process, or of all API processes under `flava serve
    --workers N` (queue depth read from Redis at scrape time)."""
    try:
        backlog, dead = await _queue_depths(state)
        metrics.BACKLOG.set(backlog)
        metrics.DEAD_LETTERS.set(dead)
        metrics.REDIS_UP.set(1)
    except RedisError as exc:
        if unavailable(exc) is None:
            raise
        metrics.REDIS_UP.set(0)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _queue_depths(state: ApiState) -> tuple[int, int]:
    pipe = state.redis.pipeline(transaction=False)
    pipe.get(state.keys.backlog)
    pipe.xlen(state.keys.dead)
    backlog, dead = await pipe.execute()
    return int(backlog or 0), int(dead)


Direction = Annotated[str, Query(pattern="^(a2v|v2a|a2a|v2v)$")]


async def search_by_clip(
    state: State,
    _: Authorized,
    clip_id: Annotated[str, Query(pattern=ANY_CLIP_ID)],
    direction: Direction = "a2v",
    k: Annotated[int, Query(ge=1, le=100)] = 10,
    version: Version = None,
    exact: bool = False,
) -> dict:
    """The `k` kept clips nearest a kept clip (the clip itself left out), by cosine in one
    version's space: the version asked or the newest with a complete index (`flava reembed`).
    `direction` a2v: the clip's audio against the others' video (v2a, a2a, v2v alike)."""
    index = await state.indexes.get(version)
    deleted = await search.tombstones(state.redis, state.keys, index)
    if clip_id in deleted:
        raise search.not_indexed(index, clip_id, "it was deleted (DELETE /clips)")
    query = search.by_clip(index, clip_id, direction)
    return await search.run(index, query, direction, k, exact, exclude=deleted | {clip_id})


async def search_by_upload(
    request: Request,
    state: State,
    _: Authorized,
    direction: Direction = "a2v",
    k: Annotated[int, Query(ge=1, le=100)] = 10,
    version: Version = None,
    exact: bool = False,
) -> dict | JSONResponse:
    """Search with a posted clip (raw body or multipart `file`): it is embedded, never learned,
    by the index's own version through the embedders, then searched as GET /search does."""
    index = await state.indexes.get(version)
    try:
        clips = await queries.read_clips(request, state.settings)
        if len(clips) != 1:
            raise ProbeError("too_many_clips", "search takes one query clip", 422)
        await anyio.to_thread.run_sync(queries.probe_all, clips, state.settings.probe_limits())
    except ProbeError as exc:
        raise HTTPException(exc.status, {"code": exc.code, "reason": str(exc)}) from exc
    await queries.check_version(state, index.version)
    await queries.check_capacity(state)
    reply = await queries.ask(state, clips, index.version)
    if reply.status != "ok":
        return queries.answer(reply)
    deleted = await search.tombstones(state.redis, state.keys, index)
    query = search.query_vector(reply, direction)
    return await search.run(index, query, direction, k, exact, exclude=deleted)


# ---- management ----------------------------------------------------------------------------


async def model_state(state: State, _: Authorized) -> dict:
    """The learner: version, generation, step, method, FLAVA's selection gate, durability,
    the durable versions a rollback can go to, and whether it is paused (asked and done)."""
    return await manage.model_state(state)


async def monitor_summary(state: State, _: Authorized) -> dict:
    """The worker's drift and forgetting summary, as it last published it."""
    return await manage.monitor_summary(state)


async def dead_letters(
    state: State,
    _: Authorized,
    before: Annotated[str | None, Query(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")] = None,
    limit: Annotated[int, Query(ge=1, le=manage.PAGE_MAX)] = 50,
) -> dict:
    """Dead letters, newest first, with their reasons, the clip's state now and whether
    POST /dead/{clip_id}/retry can re-queue it; `before` is the previous page's `next`."""
    return await manage.dead_letters(state, before, limit)


async def retry_dead(
    state: State,
    _: Authorized,
    clip_id: Annotated[str, Path(pattern=ANY_CLIP_ID)],
) -> dict:
    """Re-queue a dead clip whose bytes are still there (202), else 409 with the reason."""
    return await manage.retry_dead(state, clip_id)


async def pause_model(state: State, _: Authorized) -> dict:
    """The learner stops taking batches (clips still queue; acks and heartbeats go on)."""
    return await manage.set_paused(state, True)


async def resume_model(state: State, _: Authorized) -> dict:
    """The learner takes batches again."""
    return await manage.set_paused(state, False)


async def rollback_model(
    state: State,
    _: Authorized,
    version: Annotated[str, Query(pattern=wire.VERSION_PATTERN.pattern)],
) -> dict:
    """Go back to a durable checkpoint (`GET /model`: durable_versions); the learner goes on
    from it under a new generation, so no version name is reused (docs/versions.md)."""
    return await manage.request_rollback(state, version)
