"""A small HTTP client of the API, with a progress bar; used by ``flava push`` and the demo."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".mov": "video/quicktime",
}


class Progress:
    """A one-line text progress bar on stderr (no dependency needed for this)."""

    def __init__(self, label: str, total: int, width: int = 30):
        self.label, self.total, self.width = label, max(total, 1), width
        self.started = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        filled = int(self.width * done / self.total)
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r{self.label:<10} [{bar}] {done}/{self.total} {rate:5.1f}/s {note}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


class ApiClient:
    """POST /ingest and GET /embed with the bearer token; retries on 429/503."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def ingest(
        self,
        data: bytes,
        task: str = "",
        purpose: str = "train",
        content_type: str = "video/mp4",
        max_wait_s: float = 120.0,
    ) -> dict:
        """Queue one clip; waits out 429/503 using Retry-After; raises on other errors."""
        params = {"purpose": purpose, **({"task": task} if task else {})}
        deadline = time.monotonic() + max_wait_s
        while True:
            r = self.http.post(
                "/ingest", content=data, params=params, headers={"Content-Type": content_type}
            )
            if r.status_code not in (429, 503) or time.monotonic() > deadline:
                r.raise_for_status()
                return r.json()
            time.sleep(float(r.headers.get("Retry-After", "1")))

    def embed(self, clip_id: str) -> tuple[int, dict]:
        r = self.http.get("/embed", params={"clip_id": clip_id})
        return r.status_code, r.json()

    def wait_embedded(
        self, clip_ids: list[str], label: str, timeout_s: float, durable: bool = False
    ) -> dict[str, dict]:
        """Poll /embed until every clip is ready (200) or dead (410); shows progress.

        ``durable``: until its update is in a checkpoint (state learned / probed), not only
        embedded. Each answer gets ``seen_at`` (time.time() when the poll saw it)."""
        done: dict[str, dict] = {}
        bar, deadline = Progress(label, len(clip_ids)), time.monotonic() + timeout_s
        while len(done) < len(clip_ids) and time.monotonic() < deadline:
            for cid in clip_ids:
                if cid not in done:
                    status, body = self.embed(cid)
                    settled = not durable or body.get("state") in ("learned", "probed")
                    if status == 410 or (status == 200 and settled):
                        done[cid] = {**body, "seen_at": time.time()}
            bar.update(len(done))
            time.sleep(0.2)
        bar.close()
        return done


def push_files(url: str, token: str | None, files: list[Path], task: str | None) -> int:
    client, bar = ApiClient(url, token), Progress("ingest", len(files))
    failures = 0
    for i, path in enumerate(files, 1):
        ctype = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        try:
            answer = client.ingest(path.read_bytes(), task or "", content_type=ctype)
            bar.update(i, answer["clip_id"][:12])
        except httpx.HTTPStatusError as exc:
            failures += 1
            sys.stderr.write(f"\n{path}: {exc.response.status_code} {exc.response.text}\n")
    bar.close()
    client.close()
    return 1 if failures else 0


def push_synthetic(url: str, token: str | None, per_segment: int) -> int:
    from worker.core.synthetic import StreamConfig, drifting_stream

    cfg = StreamConfig()
    client, bar = ApiClient(url, token), Progress("ingest", per_segment * cfg.num_segments)
    for i, (spec, data) in enumerate(drifting_stream(cfg, per_segment), 1):
        client.ingest(data, task=f"segment-{spec.segment}")
        bar.update(i)
    bar.close()
    client.close()
    return 0
