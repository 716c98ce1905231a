"""Schemathesis against the service's own OpenAPI schema, with a valid admin key: whatever the
input, no 5xx, and every answer matches what the schema documents for it. `bench/fuzz.py` runs
the same with more examples (FUZZ_EXAMPLES), random seeds (FUZZ_RANDOM=1) and on SQLite too
(FUZZ_DATABASES=postgresql,sqlite)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from app.main import create_app
from tests.helpers import ADMIN_KEY, IsolatedSettings, reset_database

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
"""Examples per operation in the fuzzing phase (schemathesis adds its examples and boundaries)."""
DATABASES = os.environ.get("FUZZ_DATABASES", "postgresql").split(",")
"""PostgreSQL (the stricter: no NUL in text, typed comparisons); bench/fuzz.py adds SQLite."""
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_TOKENS = 8
"""Longer answers are cut to this: they test nothing more, and the tiny model writes about 100
tokens a second here, so the default 128 would take most of the time."""
LENGTHS = {
    "/v1/generate": ("max_new_tokens",),
    "/v1/translate": ("max_new_tokens",),
    "/v1/qa": ("max_new_tokens",),
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens", "max_completion_tokens"),
}
BOOTSTRAP_ADMIN_ID = 1
"""The key the fuzzer signs in with (the first row of an emptied database): revoking it would
turn every later case into a 401, so that one case is left out."""
STATUSES: Counter[tuple[str, int]] = Counter()
"""Answers by (operation, status code), for bench/fuzz.py's summary."""

# The schema as the app builds it (no database needed); the cases go to a live server below.
# schemathesis.pytest.from_fixture would fetch it from the server, but fails on pytest 9.2
# ('Function' object has no attribute '_nodeid', schemathesis 4.32.5).
schema = schemathesis.openapi.from_dict(
    create_app(
        IsolatedSettings(data_dir=Path(tempfile.gettempdir()), admin_api_key=ADMIN_KEY)
    ).openapi()
)


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The app in a real uvicorn server, once per database for every operation's cases."""
    db_url: str = request.getfixturevalue(
        "pg_url" if request.param == "postgresql" else "sqlite_url"
    )
    reset_database(db_url)
    app_settings = IsolatedSettings(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        database_url=db_url,
        model=str(tiny_model_dir),
        model_dtype="float32",
        admin_api_key=ADMIN_KEY,
        max_prompt_chars=2000,
        # One key sends every case: limits would answer most of them with 429.
        rate_limit_generation=None,
        rate_limit_feedback=None,
        rate_limit_read=None,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(app_settings)
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uvicorn_server.should_exit = True
    thread.join(30)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_gets_a_server_error(case: schemathesis.Case, server: str) -> None:
    """Every operation, valid and invalid input: never a 5xx, always the documented shape."""
    # Path parameters come as numbers or as strings (the coverage phase's).
    revokes_own_key = str((case.path_parameters or {}).get("key_id")) == str(BOOTSTRAP_ADMIN_ID)
    assume(not (case.method == "DELETE" and revokes_own_key))
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    if isinstance(case.body, dict):
        _shorten(case.path, case.body)
    response = case.call(base_url=server, headers=AUTH, timeout=60)
    STATUSES[(f"{case.method} {case.path}", response.status_code)] += 1
    case.validate_response(response, checks=checks, headers=AUTH)
    if response.request.headers.get("Authorization") == AUTH["Authorization"]:
        # Else every later case would only test the 401 path.
        assert response.status_code != 401, "the fuzzer's admin key stopped working"


def _shorten(path: str, body: dict[str, object]) -> None:
    """Cap valid answer lengths at MAX_TOKENS, and set it where none is given; invalid ones stay."""
    fields = LENGTHS.get(path, ())
    for field in fields:
        value = body.get(field)
        if type(value) is int and MAX_TOKENS < value <= 1024:
            body[field] = MAX_TOKENS
    if fields and all(body.get(field) is None for field in fields):
        body[fields[0]] = MAX_TOKENS  # absent or null: the default would be 128


def test_text_holding_nul_is_refused_not_a_server_error(
    client: TestClient, admin: dict[str, str]
) -> None:
    """What the fuzzer found: PostgreSQL cannot store or compare NUL, which was a 500."""
    generation = client.post(
        "/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=admin
    ).json()
    bodies = {
        "/v1/generate": {"prompt": "a\x00b", "max_new_tokens": 2},
        "/v1/keys": {"name": "a\x00b"},
        "/v1/feedback": {"generation_id": generation["id"], "correction": "a\x00b"},
        "/v1/chat/completions": {
            "model": "default",
            "messages": [{"role": "user", "content": "a\x00b"}],
            "max_tokens": 2,
        },
    }
    for path, body in bodies.items():
        response = client.post(path, json=body, headers=admin)
        assert response.status_code == 422, (path, response.text)
        assert "NUL" in response.text, response.text
    listed = client.get("/v1/generations", params={"model_version": "v\x000"}, headers=admin)
    assert listed.status_code == 200 and listed.json()["items"] == []
    activate = client.post("/v1/models/v%000/activate", headers=admin)
    assert activate.status_code == 404, activate.text
