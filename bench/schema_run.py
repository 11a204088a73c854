"""Schemathesis against a real ``flava serve`` (issue 13 §5): no request gives a 5xx but 503.

For each Redis state a private redis-server and a ``flava serve`` process are started, and
schemathesis generates requests for every operation of the API's own ``/openapi.json``:
``--examples`` positive (valid by the schema) and as many negative (schema-breaking) cases per
operation, each sent over HTTP with the bearer token. States:

- ``healthy``: Redis with room; seeded with a learner heartbeat, a published model card, one
  real clip ingested through the API and a search index holding it (so /readyz, /models,
  /search and POST /embed get past their "nothing there yet" answers).
- ``maxmemory``: the same seeding, then Redis is filled to its ``maxmemory`` (1 MB over what
  it holds at start, ``noeviction``): every write is refused with OOM.

Every response other than a 5xx, or a 503 (Redis or the embedders saying "not now"), passes;
a 5xx is kept with the request that made it (a curl line). Counts per operation and status go
to ``--out``/summary.json and summary.md.

    python -m bench.schema_run [--examples 20] [--out bench/results/schema]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

RESULT_DIR = Path("bench/results/schema")
TOKEN = "schema-run-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREFIX = "schema"
STATES = ("healthy", "maxmemory")
FILL_MARGIN = 1024 * 1024  # maxmemory = used memory after seeding + this, then filled


def allowed(status: int) -> bool:
    """Any answer but a server error; 503 is the API's "not now" (Retry-After)."""
    return status < 500 or status == 503


def _clip() -> bytes:
    from worker.core.synthetic import StreamConfig, make_clip, segment_specs

    cfg = StreamConfig(num_segments=1)
    return make_clip(segment_specs(cfg, 0, 1, seed=0)[0], cfg)


def _seed(url: str, api: str, index_dir: Path) -> None:
    """What a running system has: a learner heartbeat, a published model, a clip, and a
    search index of version 1.1 holding that clip."""
    import httpx
    import numpy as np
    import redis

    from contract import wire
    from contract.index import write_index

    keys = wire.Keys(PREFIX)
    client = redis.Redis.from_url(url)
    try:
        client.zadd(keys.workers, {"w1": time.time() + 3600})
        card = wire.ModelCard("1.1", 1, 1, 1, "flava", "tiny", time.time())
        client.hset(keys.models, card.version, card.to_json())
        client.hset(keys.model, mapping={"version": "1.1", "generation": 1, "step": 1})
    finally:
        client.close()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "video/mp4"}
    r = httpx.post(f"{api}/ingest", content=_clip(), headers=headers, timeout=60)
    assert r.status_code == 202, r.text
    vectors = np.random.default_rng(0).standard_normal((2, 1, 16))
    write_index(index_dir, "1.1", [r.json()["clip_id"]], ["seg-1"], *vectors)


def _fill(url: str) -> int:
    """Set maxmemory just above what Redis holds, then write until it refuses; -> bytes."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + FILL_MARGIN)
        client.config_set("maxmemory-policy", "noeviction")
        for i in range(10_000):
            try:
                client.set(f"filler:{i}", os.urandom(16 * 1024))
            except redis.exceptions.OutOfMemoryError:
                return int(client.info("memory")["used_memory"])
        raise RuntimeError("Redis never reached maxmemory")
    finally:
        client.close()


def _serve(redis_url: str, workdir: Path):
    from flava.procs import free_port, spawn, wait_until_ready

    port = free_port()
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_KEY_PREFIX": PREFIX,
        "FLAVA_API_TOKEN": TOKEN,
        "FLAVA_BLOB_DIR": str(workdir / "blobs"),
        "FLAVA_INDEX_DIR": str(workdir / "index"),
        "FLAVA_INPUTS_DIR": str(workdir / "inputs"),
        "FLAVA_QUERY_TIMEOUT_S": "1",
    }
    log = workdir / "serve.log"
    proc = spawn(["--log-level", "warning", "serve", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{url}/healthz", 120, [proc], log)
    return proc, url


def fuzz_operations(api: str, examples: int, seed: int = 0) -> dict:
    """Every operation, ``examples`` positive and ``examples`` negative cases; -> tallies."""
    import requests
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{api}/openapi.json")
    session = requests.Session()
    statuses: dict[str, Counter] = {}
    failures: list[dict] = []

    def send(name: str, case) -> None:
        response = case.call(base_url=api, session=session, headers=AUTH, timeout=30)
        statuses[name][response.status_code] += 1
        if not allowed(response.status_code):
            failures.append(_failure(case, response, api))

    for result in schema.get_all_operations():
        op = result.ok()
        name = f"{op.method.upper()} {op.path}"
        statuses[name] = Counter()
        for mode in GenerationMode:
            _generate(op, mode, examples, seed, lambda case, name=name: send(name, case))
    cases = sum(sum(c.values()) for c in statuses.values())
    return {"cases": cases, "statuses": statuses, "failures": failures}


def _generate(op, mode, examples: int, seed: int, send) -> None:
    """Up to ``examples`` cases of one operation in one mode, each handed to ``send``; no
    shrinking (a failing case is recorded, not raised)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable

    @hseed(seed)
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        send(case)

    try:
        run()
    except Unsatisfiable:  # negative mode: an operation with nothing to break
        pass


def _failure(case, response, api: str) -> dict:
    return {
        "operation": f"{case.method} {case.path}",
        "status": response.status_code,
        "body": response.text[:300],
        "curl": case.as_curl_command(headers={"Authorization": "Bearer <token>"}, base_url=api),
    }


def run_state(state: str, examples: int, workdir: Path) -> dict:
    """One Redis state: its own redis-server and flava serve; -> the state's tallies."""
    from flava.procs import RedisProcess, terminate

    workdir.mkdir(parents=True)
    server = RedisProcess(workdir / "redis", appendfsync="everysec")
    server.start()
    proc = None
    try:
        proc, api = _serve(server.url, workdir)
        _seed(server.url, api, workdir / "index")
        filled = _fill(server.url) if state == "maxmemory" else None
        started = time.monotonic()
        tally = fuzz_operations(api, examples)
        tally.update(state=state, seconds=round(time.monotonic() - started, 1))
        tally["redis_used_memory"] = filled
        return tally
    finally:
        if proc is not None:
            terminate(proc)
        server.stop()


def summarise(runs: list[dict], examples: int) -> dict:
    return {
        "examples_per_operation_and_mode": examples,
        "modes": ["positive", "negative"],
        "machine": f"{os.cpu_count()} cores",
        "states": [
            {
                "state": r["state"],
                "cases": r["cases"],
                "operations": len(r["statuses"]),
                "seconds": r["seconds"],
                "redis_used_memory_at_maxmemory": r["redis_used_memory"],
                "server_errors_other_than_503": len(r["failures"]),
                "failures": r["failures"],
                "statuses": {op: dict(sorted(c.items())) for op, c in r["statuses"].items()},
            }
            for r in runs
        ],
    }


def markdown(summary: dict) -> str:
    lines = ["# Schemathesis against a real flava serve", ""]
    lines.append(
        f"`python -m bench.schema_run --examples {summary['examples_per_operation_and_mode']}`"
        f" ({summary['machine']}): positive and negative cases per operation, bearer token."
    )
    for s in summary["states"]:
        lines += ["", f"## Redis {s['state']}", ""]
        lines.append(
            f"{s['cases']} cases over {s['operations']} operations in {s['seconds']} s; "
            f"5xx other than 503: **{s['server_errors_other_than_503']}**"
        )
        lines += ["", "| operation | responses by status |", "|---|---|"]
        for op, counts in s["statuses"].items():
            shown = ", ".join(f"{code}: {n}" for code, n in counts.items())
            lines.append(f"| `{op}` | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--examples", type=int, default=20, help="per operation and mode")
    p.add_argument("--states", nargs="+", choices=STATES, default=list(STATES))
    p.add_argument("--out", type=Path, default=RESULT_DIR)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_state(s, args.examples, Path(tmp) / s) for s in args.states]
    summary = summarise(runs, args.examples)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))  # noqa: T201 - a benchmark's report
    return 1 if any(s["server_errors_other_than_503"] for s in summary["states"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
