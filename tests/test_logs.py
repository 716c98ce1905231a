"""Logs never hold keys: a real server logging at DEBUG, used with every kind of key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import ADMIN_KEY, api_ready, free_port

BAD_KEY = "flm_this-key-was-never-issued-0123456789abcdef"


def _serve(
    db_url: str, model: Path, data_dir: Path, port: int, log: Path
) -> subprocess.Popen[bytes]:
    """The API as deployed (uvicorn, the app factory), everything it prints going to `log`."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env |= {
        "DATABASE_URL": db_url, "MODEL": str(model), "MODEL_DTYPE": "float32",
        "ADMIN_API_KEY": ADMIN_KEY, "DATA_DIR": str(data_dir), "LOG_LEVEL": "DEBUG",
    }  # fmt: skip
    # DEBUG everywhere, and SQLAlchemy's statements with their parameters on top: a key in any
    # query (a lookup, a stored reply) would show.
    boot = (
        "import logging, sys; from uvicorn.main import main; "
        "logging.getLogger('sqlalchemy.engine').setLevel(logging.INFO); "
        "sys.argv[1:] = ['app.main:create_app', '--factory', '--log-level', 'debug', "
        f"'--port', '{port}']; main()"
    )
    # cwd: the data directory, so that no .env of the checkout is read
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", boot],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
        )


def _wait_ready(process: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        if api_ready(base):
            return
        time.sleep(0.2)
    raise AssertionError(f"not ready:\n{log.read_text()}")


def test_no_key_reaches_the_logs(db_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Admin and user keys, a created key (in a response body, kept for an idempotent retry)
    and a bad key: none of them, nor an Authorization header, is in anything the server logs."""
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    process = _serve(db_url, tiny_model_dir, tmp_path, port, log)
    try:
        _wait_ready(process, base, log)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=base, timeout=60) as http:
            create = {**admin, "Idempotency-Key": "create-bob"}
            created = http.post("/v1/keys", json={"name": "bob"}, headers=create)
            assert created.status_code == 201, created.text
            replayed = http.post("/v1/keys", json={"name": "bob"}, headers=create)
            new_key = created.json()["key"]
            assert replayed.json()["key"] == new_key
            user = {"Authorization": f"Bearer {new_key}"}

            prompt = {"prompt": "Hello", "max_new_tokens": 4}
            answer = http.post("/v1/generate", json=prompt, headers=user)
            assert answer.status_code == 200, answer.text
            rating = {"generation_id": answer.json()["id"], "thumbs": "up"}
            assert http.post("/v1/feedback", json=rating, headers=user).status_code == 201
            assert http.get("/v1/keys/me", headers=user).status_code == 200
            assert http.get("/v1/keys", headers=user).status_code == 403
            assert http.post("/v1/generate", json={}, headers=user).status_code == 422
            assert (
                http.get("/v1/models", headers={"Authorization": f"Bearer {BAD_KEY}"}).status_code
                == 401
            )
            revoked = http.delete(f"/v1/keys/{created.json()['id']}", headers=admin)
            assert revoked.status_code == 204
            assert http.get("/v1/keys/me", headers=user).status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

    text = log.read_text()
    # What the server logged at DEBUG, so that a key in any of it would be seen.
    assert '"POST /v1/keys HTTP/1.1" 201' in text
    assert "UPDATE idempotency_keys" in text  # SQL with its parameters
    for secret in (ADMIN_KEY, new_key, BAD_KEY):
        assert secret not in text
    assert "Bearer" not in text
