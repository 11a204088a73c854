"""Query embeddings, published models and deleting clips: the API's side of each.

``POST /embed`` never touches torch here: the clips go to ``{p}:queries`` as a
:class:`contract.wire.QueryRequest`, an embedder process (worker/embedder.py) answers on
``{p}:reply:{request}``, and this side waits with BLPOP until ``query_timeout_s``. No
embedder (no fresh heartbeat), too many requests waiting, or no reply in time: 503 +
Retry-After, and a request that timed out is deleted from the stream so no embedder spends
time on it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from contract import wire
from service.probe import ProbeError, ProbeLimits, probe_clip
from service.settings import ApiSettings
from service.uploads import body_chunks

if TYPE_CHECKING:
    from service.app import ApiState

RAW_TYPES = ("video/", "audio/", "application/octet-stream", "application/mp4")
BLPOP_SLICE_S = 2.0  # below the client's 5 s socket timeout: wait in slices
REPLY_STATUS = {"undecodable": 422, "version_unknown": 404, "no_model": 503}
DELETE_NOTE = (
    "The clip's bytes, embedding and state are deleted. What the model already learned from "
    "it stays in the weights (and in published models and checkpoints made since); its "
    "decoded inputs may also stay in the learner's replay memory until they are replaced."
)
IN_FLIGHT_NOTE = (
    " A learner had already read it: it may still train on the copy it holds, but writes no "
    "embedding or state for it."
)


def unavailable(code: str, reason: str, settings: ApiSettings) -> HTTPException:
    """503 + Retry-After for a query that cannot be answered now."""
    headers = {"Retry-After": str(settings.retry_after_s)}
    return HTTPException(503, {"code": code, "reason": reason}, headers)


# ---- reading the request ------------------------------------------------------------------
async def read_clips(request: Request, settings: ApiSettings) -> list[bytes]:
    """One clip (raw body or multipart `file`) or several (repeated `file` parts)."""
    content_type = request.headers.get("content-type", "application/octet-stream")
    body = await read_capped(request, settings, settings.query_max_bytes)
    if content_type.startswith("multipart/form-data"):
        return await _from_multipart(request, body, settings)
    if not content_type.startswith(RAW_TYPES):
        raise ProbeError("unsupported_content_type", f"content type {content_type!r}", 415)
    if not body:
        raise ProbeError("empty_body", "the request body is empty", 400)
    return [body]


async def read_capped(request: Request, settings: ApiSettings, limit: int) -> bytes:
    """Read the body: 413 as soon as it passes ``limit`` bytes, 408 if it comes too slowly
    (the deadlines of an ingest's body, service/uploads.py)."""
    chunks = body_chunks(request, settings, limit, "FLAVA_QUERY_MAX_BYTES")
    return b"".join([chunk async for chunk in chunks])


async def parse_form(request: Request, body: bytes, limit: int) -> FormData:
    """A multipart body already read (and capped); 400 if it is malformed."""

    async def once():
        yield body
        yield b""

    try:
        return await MultiPartParser(request.headers, once(), max_part_size=limit).parse()
    except MultiPartException as exc:
        raise ProbeError("bad_multipart", f"malformed multipart body: {exc}", 400) from exc


async def _from_multipart(request: Request, body: bytes, settings: ApiSettings) -> list[bytes]:
    form = await parse_form(request, body, settings.query_max_bytes)
    uploads = [u for u in form.getlist("file") if isinstance(u, UploadFile)]
    if not uploads:
        raise ProbeError("no_file", "multipart upload has no 'file' part", 422)
    if len(uploads) > settings.query_max_clips:
        limit = settings.query_max_clips
        raise ProbeError("too_many_clips", f"{len(uploads)} clips; at most {limit}", 422)
    clips = [await u.read() for u in uploads]
    if not all(clips):
        raise ProbeError("empty_body", "an uploaded file is empty", 400)
    return clips


def probe_all(clips: list[bytes], limits: ProbeLimits) -> None:
    """Validate every clip (PyAV headers); the error names the first bad one."""
    for index, clip in enumerate(clips):
        try:
            probe_clip(clip, limits)
        except ProbeError as exc:
            raise ProbeError(exc.code, f"clip {index}: {exc}", exc.status) from exc


# ---- asking the embedders -------------------------------------------------------------------
async def check_version(state: ApiState, version: str | None) -> None:
    """404 for a pinned version that is not published; 503 while nothing is published."""
    listed = await state.redis.hkeys(state.keys.models)
    if version is None:
        if not listed:
            raise unavailable("no_model", "no model published yet", state.settings)
        return
    names = sorted((wire.as_text(x) for x in listed), key=wire.ModelVersion.parse, reverse=True)
    if str(wire.ModelVersion.parse(version)) not in names:
        reason = f"model {version} is not published (or was pruned); published: {names}"
        raise HTTPException(404, {"code": "version_unknown", "reason": reason})


async def check_capacity(state: ApiState) -> None:
    """503 unless an embedder sent a heartbeat lately and few requests wait."""
    newest = await state.redis.zrevrange(state.keys.embedders, 0, 0, withscores=True)
    age = time.time() - float(newest[0][1]) if newest else None
    if age is None or age > state.settings.embedder_max_age_s:
        reason = "no embedder process is running (start `flava embedder`)"
        raise unavailable("no_embedder", reason, state.settings)
    waiting = await state.redis.xlen(state.keys.queries)
    if waiting >= state.settings.query_max_pending:
        reason = f"{waiting} query requests are waiting for the embedders"
        raise unavailable("embedders_busy", reason, state.settings)


async def ask(state: ApiState, clips: list[bytes], version: str) -> wire.QueryReply:
    """Queue the request and wait for its reply; 503 (and the request deleted) on timeout."""
    settings = state.settings
    request = wire.QueryRequest.new(clips, version, settings.query_timeout_s)
    fields: dict[Any, Any] = request.to_fields()
    entry_id = await state.redis.xadd(state.keys.queries, fields)
    reply_key = state.keys.reply(request.request_id)
    while (left := request.deadline - time.time()) > 0:
        got = await state.redis.blpop([reply_key], timeout=min(left, BLPOP_SLICE_S))
        if got is not None:
            return wire.QueryReply.decode(got[1])
    await state.redis.xdel(state.keys.queries, entry_id)
    reason = f"no embedder answered within {settings.query_timeout_s} s"
    raise unavailable("embedder_timeout", reason, settings)


def answer(reply: wire.QueryReply) -> JSONResponse:
    """The embedder's reply as the route's answer: 200 with embeddings, or its error."""
    if reply.status != "ok":
        status = REPLY_STATUS.get(reply.code, 503)
        detail: dict[str, str | int] = {"code": reply.code, "reason": reply.reason}
        if reply.index >= 0:
            detail["index"] = reply.index
        return JSONResponse({"detail": detail}, status_code=status)
    rows = zip(reply.audio, reply.video, strict=True)
    return JSONResponse(
        {
            "model_version": reply.model_version,
            "step": reply.step,
            "method": reply.method,
            "dim": len(reply.audio[0]) if reply.audio else 0,
            "count": len(reply.audio),
            "embeddings": [{"index": i, "audio": a, "video": v} for i, (a, v) in enumerate(rows)],
            "trained_on": False,
            "served_by": reply.served_by,
            "batch_clips": reply.batch_clips,
        }
    )


# ---- models and deleting --------------------------------------------------------------------
async def list_models(state: ApiState) -> dict:
    """The published models, newest first, and the learner's current version."""
    pipe = state.redis.pipeline(transaction=False)
    pipe.hgetall(state.keys.models)
    pipe.hget(state.keys.model, "version")
    listed, learner = await pipe.execute()
    cards = [wire.ModelCard.from_json(v) for v in listed.values()]
    cards.sort(key=lambda c: wire.ModelVersion.parse(c.version), reverse=True)
    return {
        "newest": cards[0].version if cards else None,
        "learner_version": learner.decode() if learner else None,
        "models": [vars(c) for c in cards],
    }


async def delete_clip(state: ApiState, clip_id: str) -> JSONResponse:
    """Run DELETE_SCRIPT: 200 with what was removed, 404 for a clip this queue does not hold."""
    script_keys, args = wire.delete_call(state.keys, clip_id)
    state_was, removed, in_flight = await state.delete_script(script_keys, args)
    state_was = state_was.decode()
    if not state_was:
        detail = {"code": "unknown", "reason": f"clip {clip_id} is not in this queue"}
        return JSONResponse({"detail": detail}, status_code=404)
    note = DELETE_NOTE + (IN_FLIGHT_NOTE if in_flight else "")
    body: dict[str, str | bool] = {
        "clip_id": clip_id,
        "status": "deleted",
        "state_was": state_was,
        "removed_from_queue": bool(removed),
        "in_flight": bool(in_flight),
        "note": note,
    }
    return JSONResponse(body)
