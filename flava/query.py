"""``flava embed``, ``flava models`` and ``flava search``: the query side of the API from the
command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx

from flava.push import CONTENT_TYPES

MAX_CLIPS = 32  # POST /embed takes at most this many clips per request


def embed_files(url: str, token: str | None, files: list[Path], version: str | None) -> int:
    """POST the files to /embed (32 per request); one JSON line per file on stdout."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"version": version} if version else {}
    failed = 0
    with httpx.Client(base_url=url, headers=headers, timeout=60.0) as http:
        for start in range(0, len(files), MAX_CLIPS):
            chunk = files[start : start + MAX_CLIPS]
            r = http.post("/embed", params=params, files=[_part(p) for p in chunk])
            if r.status_code != 200:
                failed += len(chunk)
                sys.stderr.write(f"{[str(p) for p in chunk]}: {r.status_code} {r.text}\n")
                continue
            _write_lines(chunk, r.json())
    return 1 if failed else 0


def _part(path: Path) -> tuple[str, tuple[str, bytes, str]]:
    ctype = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return ("file", (path.name, path.read_bytes(), ctype))


def _write_lines(files: list[Path], body: dict) -> None:
    for path, row in zip(files, body["embeddings"], strict=True):
        line = {"file": str(path), "model_version": body["model_version"], **row}
        line.pop("index")
        sys.stdout.write(json.dumps(line) + "\n")


def print_models(url: str, token: str | None) -> int:
    """GET /models as a table: version, generation, step, published time, method."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{url}/models", headers=headers, timeout=30.0)
    if r.status_code != 200:
        sys.stderr.write(f"GET /models: {r.status_code} {r.text}\n")
        return 1
    body = r.json()
    sys.stdout.write(f"newest {body['newest']}   learner at {body['learner_version']}\n")
    sys.stdout.write(f"{'version':>14} {'gen':>4} {'step':>8}  {'published (UTC)':<20} method\n")
    for m in body["models"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m["published_at"]))
        row = f"{m['version']:>14} {m['generation']:>4} {m['step']:>8}  {when:<20} {m['method']}"
        sys.stdout.write(row + "\n")
    return 0


def search(
    url: str,
    token: str | None,
    file: Path | None,
    clip_id: str | None,
    direction: str,
    k: int,
    version: str | None,
) -> int:
    """GET /search (a kept clip) or POST /search (a query file); one line per hit."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params: dict[str, str | int] = {"direction": direction, "k": k}
    if version:
        params["version"] = version
    with httpx.Client(base_url=url, headers=headers, timeout=60.0) as http:
        if file is not None:
            r = http.post("/search", params=params, files=[_part(file)])
        else:
            r = http.get("/search", params={**params, "clip_id": clip_id or ""})
    if r.status_code != 200:
        sys.stderr.write(f"search: {r.status_code} {r.text}\n")
        return 1
    body = r.json()
    sys.stdout.write(
        f"version {body['version']} ({body['search']}, {body['indexed']} clips indexed),"
        f" {body['direction']}\n"
    )
    for rank, hit in enumerate(body["hits"], 1):
        sys.stdout.write(f"{rank:>3} {hit['score']:+.4f} {hit['clip_id']} {hit['task']}\n")
    return 0
