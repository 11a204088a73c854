"""A long upload through the running service: time to its first embedding, and to all of it.

Issue 14: "The first window's embedding must not wait for the last window's decode." A real
stack (redis-server, `flava serve`, `flava worker`, as bench/perf_service.py starts them)
takes a camera-like H.264 + AAC upload (bench/perf_windows.py makes and caches it) as one raw
POST. Measured from the client, one upload at a time, the worker already up:

- ``post``: the POST's answer (streamed to a file, hashed, probed, synced, windows queued);
- ``first embedding``: POST start -> window 0's embedding readable (GET /embed?clip_id={u}:0);
- ``all learned``: POST start -> every window settled (the upload's state ``learned``);
- the upload's windows, dead windows, versions and the pooled embedding's coverage.

TTFE / all-learned is the share of the whole upload's processing the first answer waits for.

    python -m bench.perf_upload                 # 10 min (TTFE) and 60 min (learned whole)
    python -m bench.perf_upload --minutes 10    # only the 10-minute upload
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.perf_service import ServiceConfig, Stack
from bench.perf_windows import UploadSpec, cached_upload
from bench.perfkit import Comparison, Stats

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "upload"
POLL_S = 0.05


@dataclass
class UploadBenchConfig:
    minutes: tuple[float, ...] = (10.0, 60.0)
    preset: str = "tiny"
    batch_size: int = 8  # the worker's default
    width: int = 1280
    height: int = 720
    timeout_s: float = 3600.0  # per upload, until every window settled
    out: Path = RESULTS
    service: ServiceConfig = field(default_factory=ServiceConfig)


def _stream(path: Path, chunk: int = 1 << 20):
    with path.open("rb") as f:
        while block := f.read(chunk):
            yield block


def measure_upload(stack: Stack, path: Path, timeout_s: float) -> dict[str, Any]:
    """POST ``path`` raw and follow it until every window settled; times from POST start."""
    size = path.stat().st_size
    with httpx.Client(base_url=stack.url, timeout=600) as http:
        started = time.perf_counter()
        answer = http.post(
            "/ingest",
            content=_stream(path),
            headers={"Content-Type": "video/mp4", "Content-Length": str(size)},
        )
        posted = time.perf_counter() - started
        answer.raise_for_status()
        body = answer.json()
        upload_id = body["clip_id"]
        first = _first_embedding(http, upload_id, started, timeout_s)
        final = _all_settled(http, upload_id, started, timeout_s)
        dead = http.get("/dead", params={"limit": 100}).json()["letters"]
    return {
        "file": path.name,
        "bytes": size,
        "duration_s": body["duration_s"],
        "windows": body["windows"],
        "span_s": body["span_s"],
        "post_s": round(posted, 3),
        "first_embedding_s": round(first, 3),
        "all_learned_s": round(final["seconds"], 3),
        "first_over_all": round(first / final["seconds"], 4),
        "windows_per_s": round(body["windows"] / (final["seconds"] - first), 2),
        "windows_learned": final["windows_learned"],
        "windows_dead": final["windows_dead"],
        "versions": len(final["versions"]),
        "pooled_version": final["pooled"]["model_version"] if final["pooled"] else None,
        "pooled_windows": final["pooled"]["windows"] if final["pooled"] else 0,
        "dead_reasons": sorted({letter["reason"] for letter in dead}),
    }


def _first_embedding(http: httpx.Client, upload_id: str, started: float, timeout: float) -> float:
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if http.get("/embed", params={"clip_id": f"{upload_id}:0"}).status_code == 200:
            return time.perf_counter() - started
        time.sleep(POLL_S)
    raise TimeoutError(f"no embedding of window 0 after {timeout} s")


def _all_settled(http: httpx.Client, upload_id: str, started: float, timeout: float) -> dict:
    deadline, last_log = started + timeout, 0.0
    while time.perf_counter() < deadline:
        r = http.get("/embed", params={"clip_id": upload_id})
        body = r.json()
        if r.status_code in (200, 410):
            return {**body, "seconds": time.perf_counter() - started}
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            settled = body["windows_learned"] + body["windows_dead"]
            log.info("upload %s: %d / %d windows settled", upload_id[:12], settled, body["windows"])
        time.sleep(0.5)
    raise TimeoutError(f"upload {upload_id} not settled after {timeout} s")


def run(cfg: UploadBenchConfig) -> list[dict[str, Any]]:
    rows = []
    service = ServiceConfig(preset=cfg.preset, batch_size=cfg.batch_size)
    for minutes in cfg.minutes:
        path = cached_upload(UploadSpec(minutes=minutes, width=cfg.width, height=cfg.height))
        with tempfile.TemporaryDirectory(prefix="flava-upload-") as tmp:
            with Stack(service, Path(tmp)) as stack:
                stack.start_worker()
                log.info("posting %s (%.1f GB)", path.name, path.stat().st_size / 1e9)
                rows.append(measure_upload(stack, path, cfg.timeout_s))
                log.info("%s", rows[-1])
    return rows


def bench_upload(minutes: float = 10.0, preset: str = "tiny") -> list[Comparison]:
    """bench/perf.py's row: a ``minutes`` long upload's time to its first embedding against
    its time to every window learned (the first must not wait for the last)."""
    row = run(UploadBenchConfig(minutes=(minutes,), preset=preset))[0]
    note = (
        f"{row['windows']} windows of {row['span_s']} s, {row['bytes'] / 1e9:.2f} GB, POST"
        f" answered in {row['post_s']} s, {row['windows_dead']} dead"
    )
    return [
        Comparison(
            bench="upload",
            title=f"a {minutes:g} min 720p upload: time to its first window's embedding",
            ours_label="first embedding",
            ours=Stats.of([row["first_embedding_s"]], "s"),
            ref_label="every window learned",
            ref=Stats.of([row["all_learned_s"]], "s"),
            notes=[note],
            extra=row,
        )
    ]


def markdown(rows: list[dict[str, Any]], cfg: UploadBenchConfig) -> str:
    lines = [
        "# A long upload through the running service",
        "",
        f"`python -m bench.perf_upload`: preset {cfg.preset}, worker batch {cfg.batch_size},"
        " one raw POST per upload (H.264 + AAC, bench/perf_windows.py's camera-like file),"
        " times from the POST's start as the client sees them (this 2-core machine runs the"
        " API, the worker and its 2 decode processes).",
        "",
        "| upload | size | windows | POST answered | first embedding | all learned"
        " | first / all | windows/s | dead | pooled (version: windows) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['duration_s'] / 60:.0f} min | {r['bytes'] / 1e9:.2f} GB | {r['windows']}"
            f" | {r['post_s']:.1f} s | {r['first_embedding_s']:.1f} s"
            f" | {r['all_learned_s']:.0f} s | {r['first_over_all']:.3f}"
            f" | {r['windows_per_s']:.1f} | {r['windows_dead']}"
            f" | {r['pooled_version']}: {r['pooled_windows']} of {r['windows']} |"
        )
    reasons = sorted({reason for r in rows for reason in r["dead_reasons"]})
    if reasons:
        lines += ["", "Dead windows' reasons: " + "; ".join(reasons)]
    lines += [
        "",
        "First embedding: window 0's embedding is readable while the rest are still queued;"
        " it waits for the POST (the upload must be whole and synced before its windows are"
        " queued) and for one batch, never for the last window's decode.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    # SIGTERM unwinds like ^C, so the stack's processes are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    cfg = UploadBenchConfig(minutes=tuple(args.minutes), preset=args.preset, out=args.out)
    rows = run(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary = {"config": {k: v for k, v in asdict(cfg).items() if k != "service"}, "rows": rows}
    (cfg.out / "upload.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (cfg.out / "upload.md").write_text(markdown(rows, cfg))
    print(markdown(rows, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
