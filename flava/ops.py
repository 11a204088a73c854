"""``flava status`` and ``flava dead``: the management routes from the command line
(docs/operations.md)."""

from __future__ import annotations

import json
import sys
import time

import httpx


def _client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30.0)


def _fail(r: httpx.Response) -> int:
    sys.stderr.write(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}\n")
    return 1


def status(url: str, token: str | None, action: str | None, version: str | None) -> int:
    """Print the learner's state (GET /model, /readyz, /monitor); with ``action`` (pause,
    resume, rollback) ask for it first."""
    with _client(url, token) as http:
        if action is not None:
            params = {"version": version} if action == "rollback" else {}
            r = http.post(f"/model/{action}", params=params)
            if r.status_code != 202:
                return _fail(r)
            print(f"{action}: {json.dumps(r.json())}")
        model = http.get("/model")
        if model.status_code != 200:
            return _fail(model)
        ready = http.get("/readyz").json()
        monitor = http.get("/monitor")
        print(render_status(model.json(), ready, monitor.json() if monitor.is_success else None))
    return 0


def render_status(model: dict, ready: dict, monitor: dict | None) -> str:
    sel = model.get("selection")
    paused = "paused" if model["paused"] else "learning"
    if model["pause_requested"] != model["paused"]:
        paused += " (asked: " + ("pause" if model["pause_requested"] else "resume") + ")"
    lines = [
        f"version     : {model['version']} (generation {model['generation']}, "
        f"step {model['step']}, {model['method']}/{model['preset']})",
        f"state       : {paused}; ready {ready.get('ready')}, heartbeat "
        f"{_age(model.get('worker_heartbeat_age_s'))} ago",
        f"durable     : {model['durable']}"
        + (f" ({model['checkpoint_error']})" if model.get("checkpoint_error") else "")
        + f", {model['unacked']} clips wait for a checkpoint; rollback targets "
        f"{', '.join(model['durable_versions']) or 'none'}",
    ]
    if sel is not None:
        on = f"on since step {sel['since_step']}" if sel["on"] else "off"
        lines.append(f"selection   : {on} (AVM accuracy EMA {sel['avm_accuracy_ema']:.3f})")
    if model.get("rollback_pending"):
        lines.append(f"rollback    : to {model['rollback_pending']['version']} waiting")
    if model.get("last_rollback"):
        last = model["last_rollback"]
        outcome = last.get("new_version") or last.get("reason")
        lines.append(f"last rollback: {last['version']} {last['state']}: {outcome}")
    if monitor:
        lines.append(f"monitor     : {json.dumps(monitor, sort_keys=True)[:400]}")
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


def dead(url: str, token: str | None, limit: int, retry: list[str], as_json: bool) -> int:
    """List dead letters, newest first (``limit``), or re-queue the clips in ``retry``."""
    with _client(url, token) as http:
        if retry:
            failed = 0
            for clip_id in retry:
                r = http.post(f"/dead/{clip_id}/retry")
                if r.status_code != 202:
                    failed += _fail(r)
                else:
                    print(f"{clip_id}: queued")
            return 1 if failed else 0
        r = http.get("/dead", params={"limit": limit})
        if r.status_code != 200:
            return _fail(r)
        page = r.json()
    if as_json:
        print(json.dumps(page, indent=2))
        return 0
    print(f"{page['total']} dead letters; newest {len(page['letters'])}:")
    for x in page["letters"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(x["dead_at"]))
        retry_note = "retryable" if x["retryable"] else f"not retryable ({x['state']})"
        print(f"{when}Z {x['clip_id']} task={x['task'] or '-'} {retry_note}: {x['reason']}")
    return 0
