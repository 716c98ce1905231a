"""Authentication on every route, admin-only key management, stored hashes, and the keys CLI."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import ApiKey, Role
from app.services import keys
from app.services.errors import Conflict
from tests.helpers import KNOWN_V1_ROUTES, url, v1_routes

ROOT = Path(__file__).resolve().parents[2]
Sessions = sessionmaker[Session]
Headers = dict[str, str]

ADMIN_ROUTES = {("POST", "/v1/keys"), ("GET", "/v1/keys"), ("DELETE", "/v1/keys/{key_id}")}


def count_keys(sessions: Sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(ApiKey)) or 0


def bearer(key: str) -> Headers:
    return {"Authorization": f"Bearer {key}"}


def bootstrap_id(sessions: Sessions) -> int:
    with sessions() as session:
        found = session.scalar(select(ApiKey.id).where(ApiKey.name == "bootstrap admin"))
    assert found is not None
    return found


# --- authentication -------------------------------------------------------------------------

BAD_AUTH: list[Headers] = [
    {},
    {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Token flm_abc"},
    {"Authorization": "flm_abc"},
    bearer("flm_" + "x" * 43),
    bearer("test-admin-key-0123456789x"),
]


def test_every_v1_route_needs_a_valid_key(client: TestClient, sessions: Sessions) -> None:
    """Without a key, with a malformed header or an unknown key, every /v1 route is 401 + Bearer."""
    # Bodies are `{}`: valid JSON but invalid for every body model, so a 401 also shows that the
    # key is checked before the body is validated.
    routes = v1_routes(client.app)  # type: ignore[arg-type]
    assert {(m, p) for m, p, _ in routes} >= KNOWN_V1_ROUTES
    keys_before = count_keys(sessions)
    failures = []
    for method, path, has_body in routes:
        for headers in BAD_AUTH:
            response = client.request(
                method, url(path), headers={**headers, "content-type": "application/json"},
                content=b"{}" if has_body else None,
            )  # fmt: skip
            problem = None
            if response.status_code != 401:
                problem = f"status {response.status_code}: {response.text[:200]}"
            elif response.headers.get("www-authenticate") != "Bearer":
                problem = f"WWW-Authenticate {response.headers.get('www-authenticate')!r}"
            elif not response.json().get("detail"):
                problem = "no message"
            if problem:
                failures.append(f"{method} {path} with {headers}: {problem}")
    assert not failures, "\n".join(failures)
    assert count_keys(sessions) == keys_before


def test_401_says_what_is_wrong(client: TestClient) -> None:
    """The 401 message tells a missing key apart from a wrong one."""
    for headers, message in [
        ({}, "missing API key"),
        (bearer("flm_unknown_key_value"), "unknown or revoked"),
    ]:
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert message in response.json()["detail"]


def test_auth_runs_before_path_and_query_validation(client: TestClient) -> None:
    """A malformed path or query parameter gets 401, not 422, without a key."""
    bad_path = client.get("/v1/generations/not-a-number")
    assert bad_path.status_code == 401
    bad_query = client.get("/v1/export", params={"format": "csv"})
    assert bad_query.status_code == 401
    bad_limit = client.get("/v1/generations", params={"limit": 0})
    assert bad_limit.status_code == 401


@pytest.mark.xfail(
    strict=True,
    reason="FastAPI decodes the JSON body before it resolves dependencies, so a body that is not "
    "JSON is a 422 before the key is checked (a well-formed body is 401, tested above)",
)
def test_auth_runs_before_json_decoding(client: TestClient) -> None:
    """A body that is not JSON gets 401 without a key, like every other request."""
    bad_json = client.post(
        "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 401


def test_admin_routes_refuse_a_user_key(
    client: TestClient, user: Headers, admin: Headers, sessions: Sessions
) -> None:
    """Managing keys needs an admin key: a user key gets 403 with a message and changes nothing."""
    assert {(m, p) for m, p, _ in v1_routes(client.app)} >= ADMIN_ROUTES  # type: ignore[arg-type]
    keys_before = count_keys(sessions)
    admin_id = bootstrap_id(sessions)
    for method, path in sorted(ADMIN_ROUTES):
        body = {"name": "sneaky", "role": "admin"} if method == "POST" else None
        url = path.replace("{key_id}", str(admin_id))
        response = client.request(method, url, json=body, headers=user)
        assert response.status_code == 403, (method, path, response.text)
        assert "admin" in response.json()["detail"]
    assert count_keys(sessions) == keys_before
    assert client.get("/v1/keys", headers=admin).status_code == 200  # the admin key still works


# --- keys -----------------------------------------------------------------------------------


def test_created_key_is_shown_once_stored_hashed_and_revocable(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """The secret appears only in the 201, only its SHA-256 is stored, it works until revoked."""
    created = client.post("/v1/keys", json={"name": "alice", "role": "user"}, headers=admin)
    assert created.status_code == 201, created.text
    data = created.json()
    secret = data["key"]
    assert set(data) == {"id", "name", "role", "prefix", "created_at", "revoked_at", "key"}
    assert (data["name"], data["role"], data["revoked_at"]) == ("alice", "user", None)
    assert secret.startswith("flm_") and len(secret) >= 40
    assert data["prefix"] == secret[:8]

    listed = client.get("/v1/keys", headers=admin)
    assert listed.status_code == 200
    assert secret not in listed.text
    assert all("key" not in item for item in listed.json())
    (alice,) = [item for item in listed.json() if item["id"] == data["id"]]
    assert alice == {k: v for k, v in data.items() if k != "key"}

    with sessions() as session:
        row = session.get(ApiKey, data["id"])
        assert row is not None
        assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest() != secret
        assert (row.name, row.role, row.prefix) == ("alice", Role.user, secret[:8])
        stored = [getattr(row, column.key) for column in ApiKey.__table__.columns]
        assert not any(secret in str(value) for value in stored), stored

    assert client.get("/v1/models", headers=bearer(secret)).status_code == 200
    revoked = client.delete(f"/v1/keys/{data['id']}", headers=admin)
    assert revoked.status_code == 204
    assert revoked.content == b""
    after = client.get("/v1/models", headers=bearer(secret))
    assert after.status_code == 401
    assert after.headers["www-authenticate"] == "Bearer"
    with sessions() as session:
        row = session.get(ApiKey, data["id"])
        assert row is not None and row.revoked_at is not None
    (alice,) = [k for k in client.get("/v1/keys", headers=admin).json() if k["id"] == data["id"]]
    assert alice["revoked_at"] is not None


def test_default_role_is_user(client: TestClient, admin: Headers) -> None:
    """A key created without a role is a user key: it cannot manage keys."""
    created = client.post("/v1/keys", json={"name": "bob"}, headers=admin)
    assert created.status_code == 201
    assert created.json()["role"] == "user"
    assert client.get("/v1/keys", headers=bearer(created.json()["key"])).status_code == 403


def test_two_created_keys_are_different(client: TestClient, admin: Headers) -> None:
    """Every key is fresh and random, even with the same name."""
    first = client.post("/v1/keys", json={"name": "same"}, headers=admin).json()
    second = client.post("/v1/keys", json={"name": "same"}, headers=admin).json()
    assert first["key"] != second["key"]
    assert first["id"] != second["id"]


def test_revoking_an_unknown_key_is_404(client: TestClient, admin: Headers) -> None:
    """An id that names no key is a 404 whose message names it."""
    response = client.delete("/v1/keys/777777", headers=admin)
    assert response.status_code == 404
    assert "777777" in response.json()["detail"]


def test_revoking_an_impossible_key_id_is_422(client: TestClient, admin: Headers) -> None:
    """An id no key can have is a 422 naming key_id, not a database error."""
    tolerant = TestClient(client.app, raise_server_exceptions=False)
    for key_id in ["0", "-1", str(2**31), str(2**63), "1e3", "one"]:
        response = tolerant.delete(f"/v1/keys/{key_id}", headers=admin)
        assert response.status_code == 422, (key_id, response.text)
        assert response.json()["detail"][0]["loc"] == ["path", "key_id"]


def test_the_last_admin_key_cannot_be_revoked(
    client: TestClient, admin: Headers, user: Headers, sessions: Sessions
) -> None:
    """Revoking the only active admin key is a 409; with a second admin key it can go."""
    first_admin = bootstrap_id(sessions)
    refused = client.delete(f"/v1/keys/{first_admin}", headers=admin)
    assert refused.status_code == 409
    assert "last active admin key" in refused.json()["detail"]
    assert client.get("/v1/keys", headers=admin).status_code == 200  # still works

    created = client.post("/v1/keys", json={"name": "admin 2", "role": "admin"}, headers=admin)
    assert created.status_code == 201
    second = bearer(created.json()["key"])
    assert client.delete(f"/v1/keys/{first_admin}", headers=second).status_code == 204
    assert client.get("/v1/keys", headers=admin).status_code == 401
    # The second admin is now the last one: it cannot revoke itself.
    refused = client.delete(f"/v1/keys/{created.json()['id']}", headers=second)
    assert refused.status_code == 409
    assert client.get("/v1/keys", headers=second).status_code == 200
    assert client.get("/v1/models", headers=user).status_code == 200  # user keys are unaffected


def test_two_admins_revoking_each_other_at_once_leave_one(sessions: Sessions) -> None:
    """When the only two admins revoke each other at the same moment, one of them stays active."""
    with sessions() as session:
        first = keys.create_key(session, name="admin a", role=Role.admin)[0].id
        second = keys.create_key(session, name="admin b", role=Role.admin)[0].id
    outcomes: dict[int, str] = {}
    paused = threading.Event()

    def revoke(key_id: int, pause: bool) -> None:
        with sessions() as session:
            if pause:  # hold the transaction open just before it commits
                real_commit = session.commit

                def slow_commit() -> None:
                    paused.set()
                    time.sleep(1.0)
                    real_commit()

                session.commit = slow_commit  # type: ignore[method-assign]
            try:
                keys.revoke_key(session, key_id)
                outcomes[key_id] = "revoked"
            except Conflict:
                outcomes[key_id] = "refused"

    one = threading.Thread(target=revoke, args=(first, True))
    one.start()
    assert paused.wait(10)
    two = threading.Thread(target=revoke, args=(second, False))
    two.start()
    one.join(30)
    two.join(30)
    assert sorted(outcomes.values()) == ["refused", "revoked"], outcomes
    with sessions() as session:
        active = session.scalars(
            select(ApiKey.name).where(ApiKey.role == Role.admin, ApiKey.revoked_at.is_(None))
        ).all()
    assert len(active) == 1, active


BAD_KEY_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "x" * 101}, "name"),
    ({}, "name"),
    ({"name": "ok", "role": "root"}, "role"),
    ({"name": "ok", "role": "Admin"}, "role"),
    ({"name": "ok", "scope": "all"}, "scope"),
    ({"name": "ok", "key": "flm_chosen_by_me_0123456789"}, "key"),
]


def test_bad_key_bodies_are_named(client: TestClient, admin: Headers, sessions: Sessions) -> None:
    """Each bad field of a new key is named in a 422, and no key is created."""
    keys_before = count_keys(sessions)
    for body, field in BAD_KEY_BODIES:
        response = client.post("/v1/keys", json=body, headers=admin)
        assert response.status_code == 422, (body, response.text)
        locations = [d["loc"] for d in response.json()["detail"]]
        assert any(loc[-1] == field for loc in locations), (body, locations)
    assert count_keys(sessions) == keys_before


# --- CLI ------------------------------------------------------------------------------------


def cli(settings: Settings, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m app.cli` against the test database, as an operator would."""
    env = {k: v for k, v in os.environ.items() if k != "ADMIN_API_KEY"}
    env |= {
        "DATABASE_URL": settings.sqlalchemy_url,
        "DATA_DIR": str(data_dir),
        "MODEL": settings.model,
        "PYTHONPATH": str(ROOT),
        "PYTHONIOENCODING": "utf-8",
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=data_dir.parent, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_creates_lists_and_revokes_keys(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    """A key made with `keys create` works at once; `keys list` hides it; `keys revoke` ends it."""
    if not settings.sqlalchemy_url.startswith("sqlite"):
        # Each CLI call is a fresh interpreter (~2 s); once is enough. SQLite is the default
        # deployment and the case where two processes share the database file.
        pytest.skip("the CLI runs on the SQLite backend only")
    data_dir = tmp_path / "cli-data"
    created = cli(settings, data_dir, "keys", "create", "--name", "cli", "--role", "admin")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    secret = lines[-1].strip()
    assert secret.startswith("flm_")
    match = re.match(r"created key (\d+) \(admin\) 'cli'", lines[0])
    assert match, created.stdout
    new_id = int(match.group(1))

    assert client.get("/v1/keys", headers=bearer(secret)).status_code == 200

    listed = cli(settings, data_dir, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    (line,) = [row for row in listed.stdout.splitlines() if row.startswith(f"{new_id}\t")]
    assert secret[:8] in line and "admin" in line and "active" in line
    assert secret not in listed.stdout

    revoked = cli(settings, data_dir, "keys", "revoke", str(new_id))
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked key {new_id}" in revoked.stdout
    assert client.get("/v1/keys", headers=bearer(secret)).status_code == 401

    unknown = cli(settings, data_dir, "keys", "revoke", "999999")
    assert unknown.returncode != 0
    assert "999999" in unknown.stderr


def test_cli_and_make_create_rater_keys(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    """`make key ROLE=rater` (which runs `keys create --role rater`) makes a working rater key,
    which manages nothing."""
    makefile = (ROOT / "Makefile").read_text()
    assert "keys create --role $(or $(ROLE),user)" in makefile
    assert "ROLE=user|rater|admin" in makefile
    if not settings.sqlalchemy_url.startswith("sqlite"):
        pytest.skip("the CLI runs on the SQLite backend only")
    created = cli(
        settings, tmp_path / "cli-data", "keys", "create", "--name", "r", "--role", "rater"
    )
    assert created.returncode == 0, created.stderr
    assert re.match(r"created key \d+ \(rater\) 'r'", created.stdout), created.stdout
    secret = created.stdout.strip().splitlines()[-1].strip()
    assert client.get("/v1/keys/me", headers=bearer(secret)).json()["role"] == "rater"
    assert client.get("/v1/keys", headers=bearer(secret)).status_code == 403
