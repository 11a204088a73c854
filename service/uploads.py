"""Long uploads: received to a file, cut into windows, answered per window and pooled.

An upload longer than one example (``contract.windows``) does not travel through Redis: the
raw body is streamed to a partial file in ``blob_dir`` (hashed on the way, never whole in
memory), probed there, synced and renamed to ``blob_dir/{sha256}``, and only then are its
windows queued (INGEST_UPLOAD_SCRIPT): an accepted upload's bytes are on disk first. Each
window is a clip of its own (``{upload}:{i}``) that the worker decodes from the file, learns
and embeds; the worker removes the file once every window has settled.

The pooled embedding of an upload is the mean of its windows' L2-normalised embeddings made
by **one** model version (docs/versions.md: nothing is pooled across versions), normalised
again: from a search index that holds every window (``flava reembed`` embedded them all with
one version; ``source: index``), else from the live embeddings of the version that embedded
most windows (``source: live``); the answer says how many windows that is.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from contract import wire
from contract.index import unit_rows
from contract.windows import PARTIAL_SUFFIX, upload_path
from service.probe import ProbeError
from service.settings import ApiSettings

if TYPE_CHECKING:
    from service.app import ApiState

PAGE_MAX = 500  # window embeddings per GET /embed?windows=true page


@dataclass
class Received:
    """A raw body as it arrived: in memory while small, else in a partial file."""

    sha256: str
    size: int
    data: bytes | None  # the body, when it stayed under max_body_bytes
    partial: Path | None  # else the partial file holding it

    @property
    def source(self) -> bytes | Path:
        return self.data if self.data is not None else self.partial  # type: ignore[return-value]

    def discard(self) -> None:
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)


async def receive_raw(request: Request, settings: ApiSettings) -> Received:
    """Stream a raw body: hashed as it comes, kept in memory up to ``max_body_bytes``, then
    spilled to a partial file in ``blob_dir``; 413 past ``max_upload_bytes``."""
    limit = settings.max_upload_bytes
    digest, size = hashlib.sha256(), 0
    chunks: list[bytes] = []
    partial, out = None, None
    try:
        async for chunk in body_chunks(request, settings, limit, "FLAVA_MAX_UPLOAD_BYTES"):
            size += len(chunk)
            digest.update(chunk)
            if out is None and size > settings.max_body_bytes:
                partial = _partial_path(settings.blob_dir)
                out = partial.open("wb")
                out.writelines(chunks)
                chunks = []
            if out is not None:
                out.write(chunk)
            else:
                chunks.append(chunk)
    except BaseException:
        if out is not None:
            out.close()
            partial.unlink(missing_ok=True)  # type: ignore[union-attr]
        raise
    if out is not None:
        out.close()
    data = b"".join(chunks) if out is None else None
    return Received(digest.hexdigest(), size, data, partial)


async def body_chunks(
    request: Request, settings: ApiSettings, limit: int, name: str
) -> AsyncGenerator[bytes, None]:
    """The body as it comes: 413 past ``limit`` bytes (the setting ``name``), 408 when the
    client stalls: no byte for ``body_idle_s``, or, after ``body_grace_s``, fewer than
    ``body_min_rate`` bytes a second on average (a client trickling a byte every few seconds
    would hold its connection and its buffers for ever)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"body of {declared} bytes exceeds {limit} ({name})")
    started, size = time.monotonic(), 0
    chunks = request.stream().__aiter__()
    while True:
        allowed = started + settings.body_grace_s + size / settings.body_min_rate
        wait = min(settings.body_idle_s, allowed - time.monotonic())
        try:
            with anyio.fail_after(max(wait, 0.0)):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            reason = (
                f"the body came too slowly: {size} bytes in {time.monotonic() - started:.1f} s "
                f"(at least {settings.body_min_rate} bytes/s after {settings.body_grace_s} s, "
                f"no pause over {settings.body_idle_s} s)"
            )
            raise ProbeError("body_timeout", reason, 408) from None
        size += len(chunk)
        if size > limit:
            raise _too_large(f"body exceeds {limit} bytes ({name})")
        yield chunk


async def receive_form(request: Request, settings: ApiSettings, limit: int) -> FormData:
    """A multipart body parsed as it streams in (capped and timed as ``body_chunks``): its
    file parts are spooled (to disk past 1 MB), never joined in memory; 400 if malformed."""
    chunks = body_chunks(request, settings, limit, "FLAVA_MAX_BODY_BYTES")
    try:
        return await MultiPartParser(request.headers, chunks, max_part_size=limit).parse()
    except MultiPartException as exc:
        raise ProbeError("bad_multipart", f"malformed multipart body: {exc}", 400) from exc


def _partial_path(blob_dir: str) -> Path:
    folder = Path(blob_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".{secrets.token_hex(8)}{PARTIAL_SUFFIX}"


def _too_large(reason: str) -> ProbeError:
    return ProbeError("too_large", reason, 413)


def store(received: Received, blob_dir: str) -> Path:
    """The upload's bytes as ``blob_dir/{sha256}``, synced (file and directory) before any
    window is queued; runs in a worker thread."""
    partial = received.partial or _partial_path(blob_dir)
    if received.data is not None:
        partial.write_bytes(received.data)
    with partial.open("rb+") as f:
        os.fsync(f.fileno())
    final = upload_path(blob_dir, received.sha256)
    partial.rename(final)  # same bytes if it is there already (a duplicate): harmless
    received.partial = None
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return final


async def enqueue_upload(state: ApiState, upload: wire.Upload, path: Path) -> tuple[str, str, str]:
    """Queue the upload's windows; -> (outcome, detail, epoch). The file goes again when
    the upload is not admitted (queue full) or is a duplicate of one already settled."""
    script_keys, args = wire.ingest_upload_call(state.keys, upload, state.settings.max_backlog)
    outcome, detail, epoch = (
        x.decode() for x in await state.ingest_upload_script(script_keys, args)
    )
    if outcome == "full" or (outcome == "duplicate" and detail in wire.SETTLED_STATES):
        await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
    return outcome, detail, epoch


# ---- answering for an upload ------------------------------------------------------------------
async def upload_answer(
    state: ApiState,
    upload_id: str,
    upload: dict,
    version: str | None,
    windows: bool,
    offset: int,
    limit: int,
) -> JSONResponse:
    """GET /embed for an upload: progress, the pooled embedding of one version, and a page of
    its windows' embeddings when ``windows``. 200 once every window settled, else 202."""
    fields = {k.decode(): v.decode() for k, v in upload.items()}
    count = int(fields["windows"])
    pipe = state.redis.pipeline(transaction=False)
    for i in range(count):
        pipe.hgetall(state.keys.embedding(wire.window_id(upload_id, i)))
    embeddings = [wire.Embedding.from_fields(e) if e else None for e in await pipe.execute()]
    settled = fields["state"] in wire.SETTLED_STATES
    body = {
        "clip_id": upload_id,
        "status": "ready" if settled else "pending",
        "state": fields["state"],
        "windows": count,
        "windows_embedded": sum(e is not None for e in embeddings),
        "windows_learned": int(fields.get("windows_learned", 0)),
        "windows_dead": int(fields.get("windows_dead", 0)),
        "duration_s": float(fields["duration_s"]),
        "span_s": float(fields["span_s"]),
        "stride_s": float(fields["stride_s"]),
        "versions": _versions(embeddings),
        "pooled": await _indexed_pool(state, upload_id, count, version)
        or pooled(embeddings, version),
    }
    if fields["state"] == "dead":
        return JSONResponse(
            {**body, "status": "dead", "reason": "every window was dead-lettered"}, 410
        )
    if windows:
        body["window_embeddings"] = _page(upload_id, embeddings, offset, limit)
        body["offset"], body["limit"] = offset, limit
    return JSONResponse(body, status_code=200 if settled else 202)


async def _indexed_pool(
    state: ApiState, upload_id: str, count: int, version: str | None
) -> dict | None:
    """The pool over **every** window from a search index (``flava reembed`` embedded them
    all with one version): the asked version's index, else the newest; None unless that
    index holds all the upload's windows."""
    try:
        index = await state.indexes.get(version)
    except HTTPException:
        return None  # no such index: the live embeddings answer
    rows = [index.vector(wire.window_id(upload_id, i), "audio") for i in range(count)]
    if any(r is None for r in rows):
        return None
    video = [index.vector(wire.window_id(upload_id, i), "video") for i in range(count)]
    return {
        "model_version": index.version,
        "windows": count,
        "source": "index",
        "audio": _unit_mean([r for r in rows if r is not None]),
        "video": _unit_mean([v for v in video if v is not None]),
    }


def _versions(embeddings: list[wire.Embedding | None]) -> list[dict]:
    """[{model_version, windows}] over the versions that embedded windows, most windows first."""
    counts: dict[str, int] = {}
    for e in embeddings:
        if e is not None:
            counts[e.model_version] = counts.get(e.model_version, 0) + 1
    order = sorted(counts, key=lambda v: (counts[v], wire.ModelVersion.parse(v)), reverse=True)
    return [{"model_version": v, "windows": counts[v]} for v in order]


def pooled(embeddings: list[wire.Embedding | None], version: str | None) -> dict | None:
    """The mean of the windows' embeddings made by ``version`` (default: the version that
    embedded most windows, the newest on ties), L2-normalised; None if it embedded none."""
    if version is None:
        ranked = _versions(embeddings)
        if not ranked:
            return None
        version = ranked[0]["model_version"]
    else:
        version = str(wire.ModelVersion.parse(version))
    chosen = [e for e in embeddings if e is not None and e.model_version == version]
    if not chosen:
        return None
    return {
        "model_version": version,
        "windows": len(chosen),
        "source": "live",
        "audio": _unit_mean([e.audio for e in chosen]),
        "video": _unit_mean([e.video for e in chosen]),
    }


def _unit_mean(vectors: Sequence[Sequence[float] | np.ndarray]) -> list[float]:
    """The mean of the L2-normalised vectors, L2-normalised (each window counts alike)."""
    mean = unit_rows(np.asarray(vectors, dtype=np.float32)).mean(axis=0, keepdims=True)
    return unit_rows(mean)[0].tolist()


def _page(upload_id: str, embeddings: list, offset: int, limit: int) -> list[dict]:
    rows = []
    for i in range(offset, min(offset + limit, len(embeddings))):
        e = embeddings[i]
        row: dict = {"window": i, "clip_id": wire.window_id(upload_id, i)}
        if e is not None:
            row.update(model_version=e.model_version, audio=e.audio, video=e.video)
        rows.append(row)
    return rows


async def delete_upload(state: ApiState, upload_id: str, upload: dict) -> JSONResponse:
    """DELETE /clips/{upload}: every window (DELETE_SCRIPT each, so queued ones leave the
    stream and the backlog), the upload's hash and its file."""
    count = int(upload[b"windows"])
    pipe = state.redis.pipeline(transaction=False)
    for i in range(count):
        script_keys, args = wire.delete_call(state.keys, wire.window_id(upload_id, i))
        await state.delete_script(keys=script_keys, args=args, client=pipe)
    pipe.delete(state.keys.clip(upload_id))
    answers = await pipe.execute()
    removed = sum(int(a[1]) for a in answers[:count])
    in_flight = sum(int(a[2]) for a in answers[:count])
    path = upload_path(state.settings.blob_dir, upload_id)
    await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
    return JSONResponse(
        {
            "clip_id": upload_id,
            "status": "deleted",
            "state_was": upload[b"state"].decode(),
            "windows": count,
            "windows_removed_from_queue": removed,
            "windows_in_flight": in_flight,
        }
    )
