"""Probes, the database going away, the model list, and the OpenAPI description."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.schemas.feedback import ComparisonCreate, FeedbackCreate
from app.schemas.generation import GenerateRequest
from app.state import app_state, install_state
from tests.helpers import KNOWN_V1_ROUTES, v1_routes

Headers = dict[str, str]
# Nothing listens on port 1: connecting is refused at once, a real outage rather than a mock.
UNREACHABLE_DB = "postgresql+psycopg://postgres@127.0.0.1:1/none"


@contextmanager
def unreachable_database(client: TestClient) -> Iterator[None]:
    """The running app's database becomes unreachable, then comes back."""
    original = app_state(client.app)
    engine = make_engine(UNREACHABLE_DB)
    install_state(client.app, replace(original, sessions=make_sessionmaker(engine)))
    try:
        yield
    finally:
        install_state(client.app, original)
        engine.dispose()


@pytest.fixture
def database_down(client: TestClient) -> Iterator[None]:
    """The app's database is unreachable for the whole test."""
    with unreachable_database(client):
        yield


# --- probes ---------------------------------------------------------------------------------


def test_healthz_is_ok(client: TestClient) -> None:
    """The liveness probe answers 200 without a key."""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_names_the_serving_version(client: TestClient) -> None:
    """The readiness probe answers 200 with the database ok and the version being served."""
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "model": "v0"}


def test_readyz_is_503_when_the_database_is_unreachable(
    client: TestClient, database_down: None
) -> None:
    """With the database gone the probe says not ready with 503 (not 500), and why."""
    response = client.get("/readyz")
    assert response.status_code == 503
    data = response.json()
    assert data["status"] == "not ready"
    assert data["database"].startswith("unavailable")
    assert data["model"] == "v0"


def test_api_is_503_with_retry_after_when_the_database_is_unreachable(
    client: TestClient, user: Headers
) -> None:
    """An outage is a 503 with Retry-After and a JSON message (the key check is first to fail)."""
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/v1/generations", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/generate", {"prompt": "Hi", "max_new_tokens": 2}),
        ("POST", "/v1/feedback", {"generation_id": 1, "thumbs": "up"}),
    ]
    with unreachable_database(client):
        for method, path, body in requests:
            response = client.request(method, path, json=body, headers=user)
            assert response.status_code == 503, (path, response.text)
            assert int(response.headers["retry-after"]) > 0
            assert response.headers["content-type"] == "application/json"
            assert "database" in response.json()["detail"]
    # Once the database is back, requests work again.
    assert client.get("/v1/generations", headers=user).status_code == 200
    assert client.get("/readyz").status_code == 200


# --- models ---------------------------------------------------------------------------------


def test_models_lists_the_base_version_first(
    client: TestClient, user: Headers, settings: Settings
) -> None:
    """The list is OpenAI-shaped; v0, the base model, is first, active and being served."""
    response = client.get("/v1/models", headers=user)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "list"
    first = data["data"][0]
    assert {k: first[k] for k in ("name", "kind", "status", "serving", "base_model")} == {
        "name": "v0",
        "kind": "base",
        "status": "active",
        "serving": True,
        "base_model": settings.model,
    }
    assert first["activated_at"] is not None
    assert first["status_reason"] is None
    assert [v["name"] for v in data["data"] if v["serving"]] == ["v0"]


def test_generations_name_the_listed_serving_version(client: TestClient, user: Headers) -> None:
    """The version a generation reports is the one /v1/models says is serving."""
    served = client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=user)
    models = client.get("/v1/models", headers=user).json()["data"]
    assert [m["name"] for m in models if m["serving"]] == [served.json()["model_version"]]


# --- OpenAPI --------------------------------------------------------------------------------


def test_openapi_lists_every_v1_route_with_bearer_auth(client: TestClient) -> None:
    """Every /v1 operation is described, and declares the bearer key so /docs can send it."""
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    operations = {(m, p) for m, p, _ in v1_routes(client.app)}  # type: ignore[arg-type]
    assert operations >= KNOWN_V1_ROUTES
    schemes = spec["components"]["securitySchemes"]
    bearer = [name for name, s in schemes.items() if s.get("scheme", "").lower() == "bearer"]
    assert bearer
    for method, path in sorted(operations):
        operation = spec["paths"].get(path, {}).get(method.lower())
        assert operation is not None, f"{method} {path} missing from /openapi.json"
        assert any(name in req for req in operation.get("security", []) for name in bearer), (
            method,
            path,
        )


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
    return schema


def _examples(spec: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """A request body's examples: the media type's, the schema's, or assembled from its fields."""
    media = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    found: list[dict[str, Any]] = []
    if "example" in media:
        found.append(media["example"])
    found += [e["value"] for e in media.get("examples", {}).values() if "value" in e]
    schema = _resolve(spec, media["schema"])
    found += schema.get("examples", [])
    if not found:
        fields = {
            name: prop["examples"][0]
            for name, prop in schema["properties"].items()
            if prop.get("examples")
        }
        if fields and set(schema.get("required", [])) <= set(fields):
            found.append(fields)
    return found


def test_request_bodies_carry_valid_examples(client: TestClient) -> None:
    """/docs pre-fills these bodies with an example, and each example is a valid request."""
    spec = client.get("/openapi.json").json()
    bodies: list[tuple[str, type[BaseModel]]] = [
        ("/v1/generate", GenerateRequest),
        ("/v1/feedback", FeedbackCreate),
        ("/v1/comparisons", ComparisonCreate),
    ]
    for path, model in bodies:
        examples = _examples(spec, path)
        assert examples, f"no example for {path}"
        for example in examples:
            model.model_validate(example)


def test_docs_page_is_served(client: TestClient) -> None:
    """The interactive API docs answer 200 and load the OpenAPI description."""
    response = client.get("/docs")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "/openapi.json" in response.text
