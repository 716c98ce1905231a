"""Every route checks its role: the routes are read from the app, so a new one cannot slip by."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import Mount

Route = tuple[str, str]

PUBLIC: set[Route] = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/"),  # the pages sign in with a key in the browser, then call /v1
    ("GET", "/dashboard"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
PUBLIC_MOUNTS = {"/static", "/static-offline-docs"}  # the pages' and the docs' own files
ADMIN: set[Route] = {
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys"),
    ("DELETE", "/v1/keys/{key_id}"),
    ("POST", "/v1/models/{name}/activate"),
    ("POST", "/v1/training/runs"),
}
USER: set[Route] = {
    ("POST", "/v1/generate"),
    ("POST", "/v1/translate"),
    ("POST", "/v1/qa"),
    ("GET", "/v1/generations"),
    ("GET", "/v1/generations/{generation_id}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/feedback"),
    ("POST", "/v1/comparisons"),
    ("GET", "/v1/export"),
    ("GET", "/v1/models"),
    ("GET", "/v1/training/runs"),
    ("GET", "/v1/training/runs/{run_id}"),
    ("GET", "/v1/keys/me"),
    ("GET", "/v1/stats/versions"),
    ("GET", "/v1/stats/leaderboard"),
    ("GET", "/v1/stats/daily"),
}


def routes(app: FastAPI) -> set[Route]:
    """(method, path) of every route the app serves, included routers flattened."""
    found = set()
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, Mount):
            assert route.path in PUBLIC_MOUNTS, f"unexpected mount {route.path}"
            continue
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


def url(path: str) -> str:
    """The path with every parameter filled in."""
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_is_classified(client: TestClient) -> None:
    """A new route must be listed as public, admin or user here, so the tests below cover it."""
    unlisted = routes(client.app) - PUBLIC - ADMIN - USER  # type: ignore[arg-type]
    assert not unlisted, f"classify these routes in tests/test_roles.py: {sorted(unlisted)}"
    gone = (PUBLIC | ADMIN | USER) - routes(client.app)  # type: ignore[arg-type]
    assert not gone, f"no longer served, remove from tests/test_roles.py: {sorted(gone)}"


def test_no_key_or_a_bad_key_gets_401(client: TestClient) -> None:
    """Every non-public route refuses a request without a valid key, before anything else."""
    wrong = []
    for method, path in sorted(ADMIN | USER):
        for headers in ({}, {"Authorization": "Bearer flm_not-a-real-key"}, {"Authorization": "x"}):
            response = client.request(method, url(path), headers=headers)
            if response.status_code != 401 or response.headers.get("WWW-Authenticate") != "Bearer":
                wrong.append((method, path, headers, response.status_code))
    assert not wrong


def test_admin_routes_refuse_a_user_key(
    client: TestClient, user: dict[str, str], admin: dict[str, str]
) -> None:
    """A user key gets 403 on every admin route; an admin key is let through."""
    for method, path in sorted(ADMIN):
        refused = client.request(method, url(path), headers=user)
        assert refused.status_code == 403, (method, path, refused.text)
        assert "admin key" in refused.json()["detail"]
        allowed = client.request(method, url(path), headers=admin)
        assert allowed.status_code not in (401, 403), (method, path, allowed.text)


def test_user_routes_let_a_user_key_through(client: TestClient, user: dict[str, str]) -> None:
    """Nothing listed for users answers 401 or 403 to a user key."""
    for method, path in sorted(USER):
        response = client.request(method, url(path), headers=user)
        assert response.status_code not in (401, 403), (method, path, response.text)


def test_public_routes_need_no_key(client: TestClient) -> None:
    """Probes, pages and docs answer without a key."""
    for _, path in sorted(PUBLIC):
        assert client.get(path).status_code == 200, path
