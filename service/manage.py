"""Management routes' work: the model's state, the monitors' summary, dead letters, and the
operator's pause / resume / rollback (docs/operations.md).

The API never acts on the learner itself: it writes what the operator asked into
``{p}:control`` (contract/wire.py) and the worker reads that every iteration, so an answer
here is 202 (asked) and ``GET /model`` shows when the worker has done it.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from fastapi import HTTPException

from contract import wire
from contract.windows import upload_path

_MODEL_INTS = ("generation", "step", "clips_learned", "unacked", "selection_step", "paused")
PAGE_MAX = 500


def _fields(raw: dict) -> dict[str, str]:
    return {wire.as_text(k): wire.as_text(v) for k, v in raw.items()}


async def model_state(state) -> dict[str, Any]:
    """The learner as it last published itself (``{p}:model``) and what was asked of it."""
    pipe = state.redis.pipeline(transaction=False)
    pipe.hgetall(state.keys.model)
    pipe.hgetall(state.keys.control)
    pipe.zrevrange(state.keys.workers, 0, 0, withscores=True)
    model_raw, control_raw, newest = await pipe.execute()
    model, control = _fields(model_raw), _fields(control_raw)
    if not model:
        raise HTTPException(404, {"code": "no_model", "reason": "no worker has published yet"})
    ints = {k: int(model[k]) for k in _MODEL_INTS if model.get(k, "") != ""}
    selection = None
    if "avm_accuracy_ema" in model:  # FLAVA's gate: a method without one has none
        step = ints.get("selection_step", -1)
        selection = {
            "on": step >= 0,
            "since_step": step if step >= 0 else None,
            "avm_accuracy_ema": float(model["avm_accuracy_ema"]),
        }
    checkpoints = [v for v in model.get("checkpoints", "").split(",") if v]
    age = time.time() - float(newest[0][1]) if newest else None
    return {
        "version": model.get("version"),
        "generation": ints.get("generation"),
        "step": ints.get("step"),
        "method": model.get("method"),
        "preset": model.get("preset"),
        "clips_learned": ints.get("clips_learned"),
        "updated_at": float(model["updated_at"]) if "updated_at" in model else None,
        "worker_heartbeat_age_s": age,
        "selection": selection,
        "durable": not model.get("checkpoint_error"),
        "checkpoint_error": model.get("checkpoint_error") or None,
        "unacked": ints.get("unacked", 0),
        "durable_versions": checkpoints,  # what POST /model/rollback can go back to
        "paused": bool(ints.get("paused", 0)),  # as the worker last reported it
        "pause_requested": control.get("paused") == "1",
        "rollback_pending": (
            {
                "id": control["rollback_id"],
                "version": control.get("rollback_version"),
                "requested_at": float(control.get("rollback_requested_at") or 0),
            }
            if control.get("rollback_id")
            else None
        ),
        "last_rollback": json.loads(control["rollback_result"])
        if control.get("rollback_result")
        else None,
    }


async def monitor_summary(state) -> dict:
    raw = await state.redis.get(state.keys.monitor)
    if raw is None:
        reason = "the worker has not published a drift/forgetting summary yet"
        raise HTTPException(404, {"code": "no_monitor", "reason": reason})
    return json.loads(raw)


async def set_paused(state, paused: bool) -> dict:
    """Ask the learner to pause (stop taking batches; it keeps heartbeating and acking what
    a checkpoint holds) or to resume."""
    now = time.time()
    fields = {"paused": "1" if paused else "0", "paused_at" if paused else "resumed_at": now}
    await state.redis.hset(state.keys.control, mapping=fields)
    worker = await state.redis.hget(state.keys.model, "paused")
    return {
        "pause_requested": paused,
        "paused": worker == b"1",  # the worker's last report: it acts within one iteration
        "note": "the worker acts on it within one iteration (GET /model: paused)",
    }


async def request_rollback(state, version: str) -> dict:
    """Ask the learner to go back to the durable checkpoint ``version``: 404 if it has no
    such checkpoint, 409 while another rollback waits; else 202 with the request's id."""
    listed = await state.redis.hget(state.keys.model, "checkpoints")
    durable = [v for v in wire.as_text(listed or b"").split(",") if v]
    asked = str(wire.ModelVersion.parse(version))
    if asked not in durable:
        reason = f"version {asked} is not a durable checkpoint the worker keeps: {durable}"
        raise HTTPException(404, {"code": "not_durable", "reason": reason, "durable": durable})
    request_id = secrets.token_hex(8)
    script = state.redis.register_script(wire.REQUEST_ROLLBACK_SCRIPT)
    outcome, detail = (
        wire.as_text(x)
        for x in await script(keys=[state.keys.control], args=[request_id, asked, time.time()])
    )
    if outcome == "busy":
        reason = f"rollback {detail} is still waiting for the worker"
        raise HTTPException(409, {"code": "rollback_pending", "reason": reason, "id": detail})
    return {
        "id": request_id,
        "version": asked,
        "status": "requested",
        "note": "the worker rolls back at its next iteration and continues under a new "
        "generation; GET /model shows last_rollback",
    }


async def dead_letters(state, before: str | None, limit: int) -> dict:
    """A page of dead letters, newest first: ``before`` is the ``next`` of the page before."""
    if before is not None:
        _check_cursor(before)
    if before is not None and _first_id(before):
        rows = []  # nothing comes before the first possible id (Redis refuses "(0-0")
    else:
        top = f"({before}" if before else "+"
        rows = await state.redis.xrevrange(state.keys.dead, max=top, min="-", count=limit + 1)
    page, more = rows[:limit], len(rows) > limit
    letters = [_letter(eid, fields) for eid, fields in page]
    pipe = state.redis.pipeline(transaction=False)
    for letter in letters:
        cid = letter["clip_id"]
        pipe.hget(state.keys.clip(cid), "state")
        pipe.exists(state.keys.blob(cid))
        if letter.get("upload"):
            pipe.hget(state.keys.clip(letter["upload"]), "windows_left")
        else:
            pipe.exists("")  # a placeholder: three answers per letter
    answers = await pipe.execute()
    for i, letter in enumerate(letters):
        clip_state, blob, left = answers[3 * i : 3 * i + 3]
        letter["state"] = wire.as_text(clip_state) if clip_state else None
        bytes_kept = int(left or 0) > 0 if letter.get("upload") else bool(blob)
        letter["retryable"] = letter["state"] == "dead" and bytes_kept
    total = await state.redis.xlen(state.keys.dead)
    return {"total": total, "letters": letters, "next": letters[-1]["id"] if more else None}


STREAM_ID_MAX = 2**64 - 1  # each half of a Redis stream id is an unsigned 64-bit number


def _check_cursor(entry_id: str) -> None:
    """422 for a cursor that fits the pattern but is no stream id (a half past 2^64 - 1):
    Redis would refuse it with an error the API would answer 500."""
    ms, _, seq = entry_id.partition("-")
    if int(ms) > STREAM_ID_MAX or int(seq) > STREAM_ID_MAX:
        reason = f"`before` must be a stream id: two numbers up to {STREAM_ID_MAX}"
        raise HTTPException(422, {"code": "bad_cursor", "reason": reason})


def _first_id(entry_id: str) -> bool:
    """Whether a stream id is 0-0, the smallest there is."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) == 0 and int(seq or 0) == 0


def _letter(entry_id, fields: dict) -> dict[str, Any]:
    f = _fields(fields)
    eid = wire.as_text(entry_id)
    letter: dict[str, Any] = {
        "id": eid,
        "dead_at": wire.dead_at(eid),
        "clip_id": f.get("clip_id", ""),
        "reason": f.get("reason", ""),
        "deliveries": int(f.get("deliveries") or 0),
        "task": f.get("task", ""),
        "purpose": f.get("purpose", ""),
        "size": int(f.get("size") or 0),
    }
    if f.get("upload"):
        letter["upload"] = f["upload"]
        letter["start_s"] = float(f.get("start_s") or 0)
    return letter


_GONE = {
    "blob_expired": "the clip's bytes are gone (kept FLAVA_DEAD_BLOB_TTL_S after its dead "
    "letter, and never past their ingest TTL): POST /ingest the bytes again",
    "upload_settled": "every window of its upload has settled, so the upload's file was "
    "removed: POST /ingest the upload again",
    "file_missing": "the upload's file is not in FLAVA_BLOB_DIR: POST /ingest the upload again",
}


async def retry_dead(state, clip_id: str) -> dict:
    """Re-queue a dead clip whose bytes are still there (202), or say why not."""
    if wire.WINDOW_ID_PATTERN.match(clip_id):
        upload = clip_id.partition(":")[0]
        if not upload_path(state.settings.blob_dir, upload).exists():
            raise HTTPException(409, {"code": "bytes_gone", "reason": _GONE["file_missing"]})
    elif await state.redis.hexists(state.keys.clip(clip_id), "windows"):
        reason = "an upload is retried window by window (POST /dead/{upload}:{i}/retry)"
        raise HTTPException(409, {"code": "is_upload", "reason": reason})
    limits = state.settings.ingest_limits()
    script = state.redis.register_script(wire.RETRY_SCRIPT)
    script_keys, args = wire.retry_call(state.keys, clip_id, limits)
    outcome, detail = (wire.as_text(x) for x in await script(keys=script_keys, args=args))
    if outcome == "queued":
        return {"clip_id": clip_id, "status": "queued", "entry_id": detail}
    if outcome == "unknown":
        raise HTTPException(404, {"code": "unknown", "reason": f"no clip {clip_id}"})
    if outcome == "not_dead":
        reason = f"the clip is {detail}, not dead: nothing to retry"
        raise HTTPException(409, {"code": "not_dead", "reason": reason, "state": detail})
    if outcome == "bytes_gone":
        raise HTTPException(409, {"code": "bytes_gone", "reason": _GONE[detail]})
    code = "backlog_full" if outcome == "full" else "backlog_bytes_full"
    reason = f"the backlog is full ({detail}); retry later"
    raise HTTPException(
        429, {"code": code, "reason": reason}, {"Retry-After": str(state.settings.retry_after_s)}
    )
