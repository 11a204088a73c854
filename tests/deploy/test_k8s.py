"""The Kubernetes manifests (deploy/kustomization.yaml, deploy/k8s/), checked without a cluster.

Every object is validated against the Kubernetes OpenAPI schemas bundled in
``kubernetes-validate`` (strict: unknown fields fail), and the checks tie the objects together
and to compose: the Services reach the ports the pods expose, the API and the learner share
ReadWriteMany volumes where compose shares its volumes, Redis runs with compose's settings,
Prometheus scrapes one target per pod, every pod meets the restricted security profile.
checkov's checks run from scripts/checkov.sh (its own virtualenv: see there).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
WORKLOADS = ("Deployment", "StatefulSet")
# an older release clusters still run, and the newest whose schemas the package bundles
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def generated_configmaps(kustomization: dict) -> list[dict]:
    """The ConfigMaps kustomize makes from ``configMapGenerator`` (``files``: ``key=path`` or
    ``path``, keyed by its file name), with the kustomization's namespace."""
    out = []
    for gen in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in gen["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (DEPLOY / path).read_text()
        meta = {"name": gen["name"], "namespace": kustomization["namespace"]}
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objects(kustomization) -> list[dict]:
    docs = []
    for path in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / path).read_text()) if d]
    return docs + generated_configmaps(kustomization)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def find(objects: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOADS]


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def mounts(workload: dict) -> dict[str, dict]:
    """mountPath -> the volume (or volumeClaimTemplate) it mounts."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for t in workload["spec"].get("volumeClaimTemplates", []):
        volumes[t["metadata"]["name"]] = {"volumeClaimTemplate": t}
    return {m["mountPath"]: volumes[m["name"]] for m in container(workload)["volumeMounts"]}


def shared_env(objects: list[dict]) -> dict[str, str]:
    return find(objects, "ConfigMap", "flava-env")["data"]


def test_the_kustomization_lists_every_manifest(kustomization):
    listed = {DEPLOY / p for p in kustomization["resources"]}
    assert listed == set((DEPLOY / "k8s").glob("*.yaml"))
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(objects, version):
    assert len(objects) > 20
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_catches_a_misspelt_field(objects):
    """The validation above can fail: a probe field misspelt, a replica count as a string."""
    api = find(objects, "Deployment", "flava-api")
    broken = yaml.safe_load(yaml.safe_dump(api))
    container(broken)["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(api))
    broken["spec"]["replicas"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_every_object_lives_in_the_restricted_namespace(objects):
    ns = find(objects, "Namespace", "flava")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "flava", obj["metadata"]["name"]


def test_shared_settings_are_composes(objects, compose):
    """flava-env holds compose's x-flava-env, with compose's defaults for its ${VAR:-x}."""
    want = {
        k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
        for k, v in compose["x-flava-env"].items()
    }
    assert shared_env(objects) == want
    redis_host = re.match(r"redis://([^:/]+):(\d+)", want["FLAVA_REDIS_URL"]).groups()
    service = find(objects, "Service", redis_host[0])
    assert service["spec"]["ports"][0]["port"] == int(redis_host[1])


def test_redis_keeps_composes_settings_on_a_claim(objects, compose):
    redis = find(objects, "StatefulSet", "redis")
    assert container(redis)["command"] == compose["services"]["redis"]["command"]
    assert container(redis)["image"] == compose["services"]["redis"]["image"]
    data = mounts(redis)["/data"]["volumeClaimTemplate"]
    assert data["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert redis["spec"]["replicas"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert container(redis)[probe]["exec"]["command"] == ["redis-cli", "ping"]
    # maxmemory must fit under the container's memory limit
    limit = container(redis)["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and int(limit[:-2]) > 2
    policy = find(objects, "NetworkPolicy", "redis")
    (rule,) = policy["spec"]["ingress"]
    allowed = rule["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert sorted(allowed) == ["api", "embedder", "learner"]  # the indexer needs no Redis


def test_the_api_probes_token_workers_and_autoscaler(objects):
    api = find(objects, "Deployment", "flava-api")
    c = container(api)
    assert c["args"][:1] == ["serve"] and int(c["args"][c["args"].index("--workers") + 1]) > 1
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "http", "containerPort": 8000} in c["ports"]
    assert env(c)["FLAVA_API_TOKEN"] == {"secretKeyRef": {"name": "flava-api", "key": "token"}}
    assert c["envFrom"] == [{"configMapRef": {"name": "flava-env"}}]
    # the metric files lie on a writable emptyDir (the root filesystem is read-only)
    metrics_dir = Path(env(c)["PROMETHEUS_MULTIPROC_DIR"])
    (tmp,) = [m for m in mounts(api) if metrics_dir.is_relative_to(m)]
    assert "emptyDir" in mounts(api)[tmp]
    hpa = find(objects, "HorizontalPodAutoscaler", "flava-api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "flava-api")
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= low < high
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in c["resources"]["requests"]  # a CPU utilisation target needs a request
    pdb = find(objects, "PodDisruptionBudget", "flava-api")
    assert pdb["spec"]["selector"]["matchLabels"] == api["spec"]["selector"]["matchLabels"]


def test_one_learner_with_its_checkpoint_claim(objects, compose):
    learner = find(objects, "StatefulSet", "flava-learner")
    c = container(learner)
    assert learner["spec"]["replicas"] == 1 and c["args"] == ["worker"]
    e = env(c)
    assert "volumeClaimTemplate" in mounts(learner)[e["FLAVA_CHECKPOINT_DIR"]]
    models = find(objects, "ConfigMap", "flava-env")["data"]["FLAVA_MODELS_DIR"]
    assert mounts(learner)[models]["persistentVolumeClaim"]["claimName"] == "flava-models"
    assert e["FLAVA_CONSUMER"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # stable
    assert "FLAVA_API_TOKEN" not in e
    assert {"name": "metrics", "containerPort": int(e["FLAVA_METRICS_PORT"])} in c["ports"]
    grace = int(compose["services"]["worker"]["stop_grace_period"].removesuffix("s"))
    assert learner["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1  # as compose reserves one


@pytest.mark.parametrize("setting", ["FLAVA_BLOB_DIR", "FLAVA_INPUTS_DIR"])
def test_api_and_learner_share_a_read_write_many_claim(objects, compose, setting):
    path = shared_env(objects)[setting]
    claims = set()
    for name in ("flava-api", "flava-learner"):
        workload = [w for w in workloads(objects) if w["metadata"]["name"] == name][0]
        claims.add(mounts(workload)[path]["persistentVolumeClaim"]["claimName"])
    (claim,) = claims
    assert find(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    # compose shares one volume at the same path between the same two
    api, worker = (compose["services"][s]["volumes"] for s in ("api", "worker"))
    shared = {v for v in api if v.endswith(f":{path}")}
    assert shared and shared == {v for v in worker if v.endswith(f":{path}")}


def test_services_reach_the_ports_their_pods_name(objects):
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        pods = [
            w
            for w in workloads(objects)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, svc["metadata"]["name"]
        names = {p["name"] for p in container(pods[0])["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, svc["metadata"]["name"]
    for w in (o for o in objects if o["kind"] == "StatefulSet"):
        governing = find(objects, "Service", w["spec"]["serviceName"])
        assert governing["spec"]["selector"] == w["spec"]["selector"]["matchLabels"]


def test_every_configmap_claim_and_secret_named_exists(objects):
    readme = (ROOT / "README.md").read_text()
    for w in workloads(objects):
        spec = w["spec"]["template"]["spec"]
        for v in spec.get("volumes", []):
            if "configMap" in v:
                find(objects, "ConfigMap", v["configMap"]["name"])
            if "persistentVolumeClaim" in v:
                find(objects, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
            if "secret" in v:  # made by the operator, as the README says
                assert f"create secret generic {v['secret']['secretName']}" in readme
        c = container(w)
        for ref in c.get("envFrom", []):
            find(objects, "ConfigMap", ref["configMapRef"]["name"])
        for value in env(c).values():
            if isinstance(value, dict) and "secretKeyRef" in value:
                assert f"create secret generic {value['secretKeyRef']['name']}" in readme


def test_every_pod_meets_the_restricted_profile_with_limits_and_probes(objects):
    """What a security review (and checkov, scripts/checkov.sh) looks for in each pod."""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for w in workloads(objects):
        name, spec = w["metadata"]["name"], w["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        c = container(w)
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), name
        assert "readinessProbe" in c and "livenessProbe" in c, name
        image, _, tag = c["image"].rpartition(":")
        assert image and tag and tag != "latest", name
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert any(
            p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
            for p in policies
            if "matchLabels" in p["spec"]["podSelector"]
        ), f"{name}: no NetworkPolicy selects it"


def test_prometheus_scrapes_every_api_pod_and_the_learner(objects):
    prom = find(objects, "StatefulSet", "prometheus")
    (config_file,) = [a for a in container(prom)["args"] if a.startswith("--config.file=")]
    config_path = Path(config_file.split("=", 1)[1])
    volume = mounts(prom)[str(config_path.parent)]
    data = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    config = yaml.safe_load(data[config_path.name])
    assert set(config["rule_files"]) <= set(data)
    # the same jobs as compose's Prometheus (dashboards and alerts are shared)
    compose_jobs = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {job["job_name"] for job in compose_jobs}
    for job, workload in (("api", "flava-api"), ("worker", "flava-learner")):
        (sd,) = jobs[job]["dns_sd_configs"]
        (name,) = sd["names"]
        svc = find(objects, "Service", name)
        # headless and listing unready pods too: one target per pod, every pod scraped
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
        w = [x for x in workloads(objects) if x["metadata"]["name"] == workload][0]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert sd["port"] in {p["containerPort"] for p in container(w)["ports"]}


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool: scripts/test-deps.sh")
def test_promtool_accepts_the_kubernetes_scrape_config():
    run = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus-k8s.yml")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_mounts_composes_provisioning(objects, compose):
    grafana = find(objects, "Deployment", "grafana")
    m = mounts(grafana)
    provisioning = compose["services"]["grafana"]["volumes"]
    for entry in provisioning:
        source, target = entry.split(":")[:2]
        if not source.startswith("./deploy/grafana"):
            continue
        local = ROOT / source
        if target == "/etc/grafana/provisioning":  # one ConfigMap per provisioning folder
            for sub in (p for p in local.iterdir() if p.is_dir()):
                cm = find(objects, "ConfigMap", m[f"{target}/{sub.name}"]["configMap"]["name"])
                assert cm["data"] == {p.name: p.read_text() for p in sub.iterdir()}
        else:
            cm = find(objects, "ConfigMap", m[target]["configMap"]["name"])
            assert cm["data"] == {p.name: p.read_text() for p in local.iterdir()}
    e = env(container(grafana))
    home = Path(e["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    dashboards = find(objects, "ConfigMap", m[str(home.parent)]["configMap"]["name"])
    assert home.name in dashboards["data"]
    password = Path(e["GF_SECURITY_ADMIN_PASSWORD__FILE"])
    assert m[str(password.parent)]["secret"]["items"][0]["path"] == password.name
    # the datasource names prometheus:9090, which the Service answers in the namespace
    source = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    host, port = re.match(r"http://([^:]+):(\d+)$", source["datasources"][0]["url"]).groups()
    assert find(objects, "Service", host)["spec"]["ports"][0]["port"] == int(port)


def _claims(workload: dict) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claim name, mounted read-only) for its PersistentVolumeClaim mounts."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in container(workload)["volumeMounts"]:
        claim = volumes.get(m["name"], {}).get("persistentVolumeClaim")
        if claim:
            out[m["mountPath"]] = (claim["claimName"], m.get("readOnly", False))
    return out


def _compose_mounts(compose: dict, service: str) -> dict[str, bool]:
    """mountPath -> read-only, for a compose service's named volumes."""
    out = {}
    for entry in compose["services"][service]["volumes"]:
        source, target, *mode = entry.split(":")
        if not source.startswith("."):
            out[target] = mode == ["ro"]
    return out


@pytest.mark.parametrize(
    ("service", "workload"), [("embedder", "flava-embedder"), ("indexer", "flava-indexer")]
)
def test_embedder_and_indexer_run_composes_command_on_its_volumes(
    objects, compose, service, workload
):
    """Each role as compose runs it: its command, and every volume compose gives it on a
    ReadWriteMany claim at the same path, read-only where compose mounts it so."""
    w = find(objects, "Deployment", workload)
    c = container(w)
    assert c["args"] == compose["services"][service]["command"]
    assert c["envFrom"] == [{"configMapRef": {"name": "flava-env"}}]
    assert "FLAVA_API_TOKEN" not in env(c)  # neither serves HTTP
    claims = _claims(w)
    assert set(claims) == set(_compose_mounts(compose, service))
    for path, read_only in _compose_mounts(compose, service).items():
        claim, mounted_ro = claims[path]
        assert mounted_ro == read_only, (workload, path)
        assert find(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == [
            "ReadWriteMany"
        ]
    policy = find(objects, "NetworkPolicy", workload)
    assert policy["spec"]["ingress"] == []  # nothing connects to either


def test_the_shared_claims_tie_writers_to_readers(objects):
    """models: the learner writes, embedders and indexer read; index: the indexer writes,
    the API reads; inputs: the learner writes, the indexer reads, the API deletes."""
    env_ = shared_env(objects)
    by_name = {w["metadata"]["name"]: _claims(w) for w in workloads(objects)}
    expected = {
        "FLAVA_MODELS_DIR": {"flava-learner": False, "flava-embedder": True, "flava-indexer": True},
        "FLAVA_INDEX_DIR": {"flava-indexer": False, "flava-api": True},
        "FLAVA_INPUTS_DIR": {"flava-learner": False, "flava-indexer": True, "flava-api": False},
    }
    for setting, users in expected.items():
        path = env_[setting]
        mounted = {name: claims[path] for name, claims in by_name.items() if path in claims}
        assert {n: ro for n, (_, ro) in mounted.items()} == users, setting
        assert len({claim for claim, _ in mounted.values()}) == 1, setting
    indexer = find(objects, "Deployment", "flava-indexer")
    assert indexer["spec"]["replicas"] == 1 and indexer["spec"]["strategy"]["type"] == "Recreate"
