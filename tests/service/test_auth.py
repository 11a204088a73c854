"""Who may read what: /metrics and the docs behind the bearer token when asked (off by
default), and the OpenAPI schema declaring the bearer scheme on the routes that need it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ApiSettings

TOKEN = "s3cret-token-auth"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
OPEN_ROUTES = {"/healthz", "/readyz", "/metrics"}


def app_with(redis_url, prefix, **fields) -> TestClient:
    settings = ApiSettings(redis_url=redis_url, key_prefix=prefix, api_token=TOKEN, **fields)
    return TestClient(create_app(settings))


def test_metrics_and_docs_are_open_by_default(redis_url, prefix):
    with app_with(redis_url, prefix) as api:
        assert api.get("/metrics").status_code == 200
        assert api.get("/openapi.json").status_code == 200
        assert api.get("/docs").status_code == 200


def test_metrics_behind_the_token_when_asked(redis_url, prefix):
    with app_with(redis_url, prefix, metrics_auth=True) as api:
        refused = api.get("/metrics")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert api.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        answered = api.get("/metrics", headers=GOOD)
        assert answered.status_code == 200 and "flava_" in answered.text
        assert api.get("/openapi.json").status_code == 200  # the docs stay open


def test_docs_behind_the_token_when_asked(redis_url, prefix):
    with app_with(redis_url, prefix, docs_auth=True) as api:
        for path in ("/openapi.json", "/docs"):
            assert api.get(path).status_code == 401, path
        assert api.get("/redoc").status_code == 404
        schema = api.get("/openapi.json", headers=GOOD)
        assert schema.status_code == 200 and "/ingest" in schema.json()["paths"]
        page = api.get("/docs", headers=GOOD)
        assert page.status_code == 200 and '"/ingest"' in page.text  # the schema, inlined
        assert api.get("/metrics").status_code == 200  # metrics stay open


@pytest.mark.parametrize("field", ["metrics_auth", "docs_auth"])
def test_protecting_needs_a_token(field):
    with pytest.raises(ValueError, match="need FLAVA_API_TOKEN"):
        ApiSettings(**{field: True})


def test_the_schema_declares_the_bearer_scheme_on_every_guarded_route(redis_url, prefix):
    with app_with(redis_url, prefix) as api:
        schema = api.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes == {
        "HTTPBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "FLAVA_API_TOKEN, when the API has one",
        }
    }
    guarded = {
        (path, method)
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if op.get("security") == [{"HTTPBearer": []}]
    }
    every = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    # every route that checks the token says so, /metrics included (its check is optional)
    assert every - guarded == {(p, "get") for p in OPEN_ROUTES - {"/metrics"}}
    assert {("/ingest", "post"), ("/embed", "get"), ("/models", "get")} <= guarded
