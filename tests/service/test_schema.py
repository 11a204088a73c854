"""Property-based run of the API against its own OpenAPI schema: no input gives a 5xx.

schemathesis generates requests for every operation from /openapi.json (bounded number of
examples); each is sent with and without the bearer token through the ASGI app, against the
real Redis.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

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
                case.validate_response(response, checks=[not_a_server_error])

        run()
        checked.append(op.path)
    assert len(checked) >= 5
    # generated uploads reached the validation (not only the auth check)
    assert {code for (path, code) in statuses if path == "/ingest"} - {401}, statuses
