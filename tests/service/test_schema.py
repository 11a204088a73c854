"""The API's OpenAPI schema: every route declares its answers, and the API keeps to them.

schemathesis generates requests for every operation from /openapi.json (bounded number of
examples); each is sent with and without the bearer token through the ASGI app, against the
real Redis: no 5xx, and every answer's status, content type and body are the declared ones.
(bench/schema_run.py is the long run against a real `flava serve`, Redis healthy and full.)
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter

import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from prometheus_client import CONTENT_TYPE_LATEST
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from contract import wire
from service.app import create_app
from service.settings import ApiSettings


@pytest.fixture(scope="module")
def schema_prefix(redis_url):
    """This module's own key prefix on the shared Redis; its keys are deleted afterwards."""
    name = f"test-schema-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(redis_url)
    # a fresh worker heartbeat, so /readyz's intended 503 (no worker) is not what we test
    client.zadd(wire.Keys(name).workers, {"w": time.time() + 3600})
    yield name
    keys = list(client.scan_iter(f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def schema(redis_url, schema_prefix):
    app = create_app(
        ApiSettings(
            redis_url=redis_url,
            key_prefix=schema_prefix,
            api_token="tok",
            max_body_bytes=100_000,
            max_upload_bytes=100_000,
        )
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


def test_schema_covers_every_route(schema):
    paths = {op.path for op in operations(schema)}
    assert {"/ingest", "/embed", "/models", "/clips/{clip_id}", "/healthz", "/readyz"} <= paths


def test_no_server_errors(schema):
    checked, statuses = [], Counter()
    for op in operations(schema):

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case):
            for headers in ({"Authorization": "Bearer tok"}, {}):
                response = case.call(headers=headers)
                statuses[(case.path, response.status_code)] += 1
                case.validate_response(response, checks=CHECKS)

        run()
        checked.append(op.path)
    assert len(checked) >= 5
    # generated uploads reached the validation (not only the auth check)
    assert {code for (path, code) in statuses if path == "/ingest"} - {401}, statuses


def _operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            yield f"{method.upper()} {path}", op


def _schema_names(response: dict) -> set[str]:
    """The component names a declared response's JSON body refers to."""
    text = str(response.get("content", {}).get("application/json", {}).get("schema", {}))
    return set(re.findall(r"#/components/schemas/(\w+)", text))


@pytest.fixture(scope="module")
def spec(redis_url, schema_prefix) -> dict:
    settings = ApiSettings(redis_url=redis_url, key_prefix=schema_prefix, api_token="tok")
    with TestClient(create_app(settings)) as api:
        return api.get("/openapi.json").json()


def test_every_route_declares_its_success_model(spec):
    for name, op in _operations(spec):
        ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
        assert ok, name
        for code, response in ok.items():
            content = response.get("content", {})
            if name == "GET /metrics":
                assert list(content) == [CONTENT_TYPE_LATEST], content
                continue
            schema = content["application/json"]["schema"]
            assert _schema_names(response) or schema.get("type") == "object", (name, code)


def test_every_route_declares_its_errors_with_their_body(spec):
    own_bodies = {"GET /embed": {"ClipAnswer"}, "GET /readyz": {"Readiness", "ErrorBody"}}
    for name, op in _operations(spec):
        failing = {c: r for c, r in op["responses"].items() if c[0] in "45"}
        if name != "GET /healthz":
            assert failing, name
        for code, response in failing.items():
            expected = {"InvalidBody"} if code == "422" else {"ErrorBody"}
            assert _schema_names(response) <= expected | own_bodies.get(name, set()), (name, code)
            assert _schema_names(response), (name, code)
        if op.get("security"):
            assert "401" in failing, name
        if name not in ("GET /healthz", "GET /metrics"):
            assert "503" in failing, name  # each reads or writes Redis


def test_the_statuses_the_readme_names_are_declared(spec):
    declared = {name: set(op["responses"]) for name, op in _operations(spec)}
    named = {
        "POST /ingest": {"200", "202", "400", "401", "408", "413", "415", "422", "429", "503"},
        "GET /embed": {"200", "202", "404", "410"},
        "POST /embed": {"200", "404", "413", "415", "422", "503"},
        "GET /search": {"200", "404"},
        "POST /search": {"200", "404", "503"},
        "DELETE /clips/{clip_id}": {"200", "404"},
        "POST /dead/{clip_id}/retry": {"202", "409", "429"},
        "POST /model/rollback": {"202", "404", "409"},
    }
    for name, statuses in named.items():
        assert statuses <= declared[name], (name, statuses - declared[name])


def test_a_wrong_token_is_refused_with_a_code(redis_url, schema_prefix):
    settings = ApiSettings(redis_url=redis_url, key_prefix=schema_prefix, api_token="tok")
    with TestClient(create_app(settings)) as api:
        r = api.get("/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["detail"]["code"] == "unauthorized"
