"""The shipped Prometheus config and Grafana dashboard against a live API and worker.

A real Prometheus server (Debian package ``prometheus``; .ci/run installs it) scrapes the API
and the worker, each a real ``flava`` process on localhost, through deploy/prometheus.yml
with only its targets and interval rewritten. A short drifting stream with probe clips runs
through the API; then every PromQL expression of every shipped dashboard must return data,
with each template variable set to each of its values.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from flava.procs import free_port, spawn, terminate, wait_until_ready
from flava.push import ApiClient

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
TOKEN = "prometheus-test-token"
RATE_INTERVAL = "5m"  # $__rate_interval: a window that covers this whole test
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
# ratios that are NaN by definition while their denominator is 0 (cross-version R@1 over a
# same-version R@1 of 0: a window's few probes all missed): their series count as data
UNDEFINED_AT_ZERO = ("flava_cross_version_relative_ratio",)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install -y prometheus (see .ci/run)")
    return path


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out += [panel, *panel.get("panels", [])]  # collapsed rows nest their panels
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel."""
    return [
        (p["title"], t["expr"])
        for p in all_panels(dashboard)
        for t in p.get("targets", [])
        if t.get("expr")
    ]


# ---- static checks (no server) -----------------------------------------------------------


def test_promtool_accepts_the_shipped_config():
    result = subprocess.run(
        [binary("promtool"), "check", "config", str(ROOT / "deploy/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_its_rows_and_uses_the_provisioned_datasource():
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    assert DASHBOARDS
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
        assert rows == ["Stream", "Learning", "Drift", "Forgetting", "Durability"]
        panels = [p for p in all_panels(dashboard) if p["type"] != "row"]
        assert len({p["id"] for p in all_panels(dashboard)}) == len(all_panels(dashboard))
        for p in panels:
            assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        names = {v["name"] for v in dashboard["templating"]["list"]}
        used = {m for _, e in expressions(dashboard) for m in VARIABLE.findall(e)}
        assert used - {"__rate_interval"} <= names  # every variable used is defined


def test_every_metric_a_dashboard_queries_is_defined_by_a_process():
    from prometheus_client import REGISTRY

    import service.metrics  # noqa: F401 - registers the API's metrics
    import worker.telemetry  # noqa: F401 - registers the worker's metrics

    families = {m.name: m.type for m in REGISTRY.collect()}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    defined = {n + sfx for n, kind in families.items() for sfx in suffixes.get(kind, ("",))}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for title, expr in expressions(dashboard):
            for name in re.findall(r"\bflava_\w+", expr):
                assert name in defined, f"{title}: {name} is not defined"
        for note in dashboard["annotations"]["list"]:  # drift change points, among others
            for name in re.findall(r"\bflava_\w+", note.get("expr", "")):
                assert name in defined, f"annotation {note['name']}: {name} is not defined"
        notes = [n.get("expr", "") for n in dashboard["annotations"]["list"]]
        assert any("flava_drift_change_points_total" in e for e in notes)
        # compatible spaces: the cross-version ratio per window and lag is on the dashboard
        assert any(
            "flava_cross_version_relative_ratio" in e and "lag" in e and "window" in e
            for _, e in expressions(dashboard)
        )
    for group in yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            for name in re.findall(r"\bflava_\w+", rule["expr"]):
                assert name in defined, f"alert {rule['alert']}: {name} is not defined"


# ---- live ----------------------------------------------------------------------------------


def spawn_prometheus(config: Path, storage: Path, port: int, log: Path) -> subprocess.Popen:
    args = [
        binary("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={storage}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def localhost_config(api_port: int, worker_port: int, path: Path) -> Path:
    """deploy/prometheus.yml with the compose targets pointed at localhost, scraped every 1 s."""
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    ports = {"api": api_port, "worker": worker_port}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(ports)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    config["rule_files"] = [str(ROOT / "deploy" / f) for f in config["rule_files"]]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def stack(redis_url, prefix, tmp_path):
    """API, worker and Prometheus as real processes: yields (api_url, prometheus_url)."""
    api_port, worker_port, prom_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "FLAVA_REDIS_URL": redis_url,
        "FLAVA_KEY_PREFIX": prefix,
        "FLAVA_API_TOKEN": TOKEN,
        "FLAVA_CONSUMER": f"{prefix}-worker",
        "FLAVA_PRESET": "tiny",
        "FLAVA_METHOD": "flava",  # the default method: selection and AVM metrics are real
        "FLAVA_DEVICE": "cpu",
        "FLAVA_BATCH_SIZE": "4",
        "FLAVA_BLOCK_MS": "200",
        "FLAVA_HEARTBEAT_S": "1",
        "FLAVA_METRICS_PORT": str(worker_port),
        "FLAVA_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "FLAVA_INPUTS_DIR": str(tmp_path / "inputs"),
        "FLAVA_MODELS_DIR": str(tmp_path / "models"),
        "FLAVA_BLOB_DIR": str(tmp_path / "blobs"),
        "FLAVA_CHECKPOINT_EVERY": "1000",
        "FLAVA_MONITOR_WINDOW": "4",
        "FLAVA_MONITOR_EVERY": "1",
    }
    config = localhost_config(api_port, worker_port, tmp_path / "prometheus.yml")
    check = subprocess.run(
        [binary("promtool"), "check", "config", str(config)], capture_output=True
    )
    assert check.returncode == 0, check.stdout
    procs = [
        spawn(["serve", "--port", str(api_port)], env, tmp_path / "api.log"),
        spawn(["worker"], env, tmp_path / "worker.log"),
        spawn_prometheus(config, tmp_path / "tsdb", prom_port, tmp_path / "prometheus.log"),
    ]
    api_url, prom_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
    try:
        wait_until_ready(f"{api_url}/healthz", 120, procs[:1], tmp_path / "api.log")
        metrics_url = f"http://127.0.0.1:{worker_port}/metrics"
        wait_until_ready(metrics_url, 120, procs[1:2], tmp_path / "worker.log")
        wait_until_ready(f"{prom_url}/-/ready", 120, procs[2:], tmp_path / "prometheus.log")
        wait_scraped(prom_url)
        yield api_url, prom_url
    finally:
        for proc in procs:
            terminate(proc, timeout=30)


def wait_scraped(prom_url: str, timeout_s: float = 60.0) -> None:
    """Until Prometheus has scraped both targets once: rates need samples from before the
    stream (on a loaded machine the first scrape can come after the last ingest)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if has_finite_data(prom_url, "count(up == 1) >= 2"):
            return
        time.sleep(0.5)
    raise TimeoutError("Prometheus did not scrape the API and the worker")


def run_drifting_stream(api_url: str) -> None:
    """Probes of two segments, then each segment's training clips; waits until all learned."""
    from worker.core.synthetic import StreamConfig, make_clip, segment_specs

    cfg = StreamConfig(num_segments=2)
    client = ApiClient(api_url, TOKEN)
    ids = []
    try:
        for seg in (0, 1):
            for spec in segment_specs(cfg, seg, 4, seed=7, split="heldout"):
                ids.append(client.ingest(make_clip(spec, cfg), f"segment-{seg}", "probe"))
        train = {
            seg: [make_clip(s, cfg) for s in segment_specs(cfg, seg, 8, seed=7)] for seg in (0, 1)
        }
        for seg, clips in train.items():
            ids += [client.ingest(data, f"segment-{seg}") for data in clips]
        assert client.http.post("/ingest", content=b"not a clip").status_code >= 400
        assert client.ingest(train[0][0], "segment-0")["status"] == "duplicate"
        done = client.wait_embedded([i["clip_id"] for i in ids], "stream", timeout_s=150)
    finally:
        client.close()
    assert len(done) == len(ids) and all(d["status"] == "ready" for d in done.values())


def variable_values(prom_url: str, variable: dict) -> list[str]:
    """Every value a dashboard variable can take, asked of Prometheus for query variables."""
    if variable["type"] == "custom":
        return [v.strip() for v in variable["query"].split(",")]
    match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
    assert match, f"unsupported variable query {variable['definition']}"
    metric, label = match.groups()
    r = httpx.get(f"{prom_url}/api/v1/label/{label}/values", params={"match[]": metric})
    return r.json()["data"]


def instances(expr: str, values: dict[str, list[str]]) -> list[str]:
    """The expression with its variables substituted, one per combination of values."""
    used = sorted(set(VARIABLE.findall(expr)) - {"__rate_interval"})
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    out = []
    for combo in itertools.product(*(values[name] for name in used)):
        chosen = dict(zip(used, combo, strict=True))
        out.append(VARIABLE.sub(lambda m, chosen=chosen: chosen.get(m[1], m[0]), expr))
    return out


def has_finite_data(prom_url: str, expr: str, nan_counts: bool = False) -> bool:
    """Whether ``expr`` returns a finite value (or, with ``nan_counts``, any series)."""
    r = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", f"{expr}: {body}"
    values = [float(s["value"][1]) for s in body["data"]["result"]]
    return any(nan_counts or math.isfinite(v) for v in values)


def has_data(prom_url: str, expr: str) -> bool:
    return has_finite_data(prom_url, expr, any(m in expr for m in UNDEFINED_AT_ZERO))


def test_every_dashboard_query_returns_data_from_a_live_stream(stack):
    api_url, prom_url = stack
    run_drifting_stream(api_url)
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        values = {v["name"]: variable_values(prom_url, v) for v in dashboard["templating"]["list"]}
        assert sorted(values["window"]) == ["segment-0", "segment-1"]
        queries = [
            (title, q) for title, expr in expressions(dashboard) for q in instances(expr, values)
        ]
        missing = queries
        deadline = time.monotonic() + 30  # a few scrapes after the last clip
        while missing and time.monotonic() < deadline:
            missing = [(t, q) for t, q in missing if not has_data(prom_url, q)]
            time.sleep(1.0 if missing else 0)
        assert not missing, f"{path.name}: queries without data: {missing}"
