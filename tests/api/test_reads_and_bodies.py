"""Reads and request bodies: reads are rate-limited per key, the export streams in constant memory,
the Idempotency-Key middleware checks the key before it writes or replays, booleans are strict,
and no malformed body (however deeply nested) is a 500."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.main import create_app
from app.models import ApiKey, Feedback, Generation, IdempotencyRecord, ModelVersion, Task
from app.state import app_state
from app.web.limits import MAX_JSON_DEPTH, json_depth
from tests.helpers import ADMIN_KEY, routes, url

Sessions = sessionmaker[Session]
Headers = dict[str, str]
PROMPT = {"prompt": "Say hi.", "max_new_tokens": 2, "temperature": 1.0, "seed": 3}
CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
JSON = {"Content-Type": "application/json"}


@contextmanager
def app_with(settings: Settings, **changes: Any) -> Iterator[TestClient]:
    """The app started with some settings changed."""
    with TestClient(create_app(settings.model_copy(update=changes))) as client:
        yield client


def new_key(client: TestClient, admin: Headers, role: str = "user") -> Headers:
    response = client.post("/v1/keys", json={"name": "someone", "role": role}, headers=admin)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


def count(sessions: Sessions, table: type[Any]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


# --- Reads are rate-limited ---------------------------------------------------------------------


def test_the_read_limit_has_a_default() -> None:
    """RATE_LIMIT_READ, in the same notation as the other limits, 600 a minute unless set."""
    assert Settings.model_fields["rate_limit_read"].default == "600/minute"


def test_every_read_route_counts_against_the_read_limit(settings: Settings, admin: Headers) -> None:
    """Each GET under /v1 (read from the app, so a new one cannot slip by) counts: with a limit
    of 1 a minute, a key's second read of any of them is a 429 with Retry-After. Writes count
    against their own limits, and another key has its own allowance."""
    with app_with(settings, rate_limit_read="1/minute") as client:
        reads = sorted(p for m, p in routes(client.app) if m == "GET" and p.startswith("/v1/"))  # type: ignore[arg-type]
        assert len(reads) >= 10, reads
        for path in reads:
            key = new_key(client, admin)
            first = client.get(url(path), headers=key)
            assert first.status_code != 429, (path, first.text)
            second = client.get(url(path), headers=key)
            assert second.status_code == 429, (path, second.text)
            assert "too many read requests" in second.json()["detail"]
            assert 1 <= int(second.headers["Retry-After"]) <= 60
        assert client.post("/v1/generate", json=PROMPT, headers=key).status_code == 200
        assert client.get("/v1/keys/me", headers=new_key(client, admin)).status_code == 200


def test_reads_document_their_429(client: TestClient) -> None:
    """The schema lists the 429 on every read route."""
    paths = client.get("/openapi.json").json()["paths"]
    reads = [(path, ops["get"]) for path, ops in paths.items() if "get" in ops]
    for path, operation in reads:
        if path.startswith("/v1/"):
            assert "429" in operation["responses"], path


# --- The export streams --------------------------------------------------------------------------


def _add_rated_generations(sessions: Sessions, rows: int, output_chars: int) -> None:
    with sessions() as session:
        version_id = session.scalars(select(ModelVersion.id)).first()
        key_id = session.scalars(select(ApiKey.id)).first()
        generations = [
            {
                "task": Task.generate, "input": {"prompt": f"q{i}"}, "input_hash": f"{i:064d}",
                "prompt": f"q{i}", "params": {}, "output": f"{i} " + "x" * output_chars,
                "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1,
                "latency_ms": 1, "model_version_id": version_id, "api_key_id": key_id,
            }
            for i in range(rows)
        ]  # fmt: skip
        session.execute(insert(Generation), generations)
        ids = session.scalars(select(Generation.id).order_by(Generation.id)).all()
        session.execute(
            insert(Feedback),
            [{"generation_id": g, "api_key_id": key_id, "thumbs": "up"} for g in ids],
        )
        session.commit()


def test_the_export_streams_in_constant_memory(live: str, sessions: Sessions) -> None:
    """30 MB of ratings go out as JSON Lines in many chunks while the process holds a small,
    fixed share of it (it used to build the whole table, then the whole text, in memory)."""
    rows, output_chars = 6000, 5000
    _add_rated_generations(sessions, rows, output_chars)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    total = chunks = lines = 0
    tracemalloc.start()
    try:
        with httpx.stream(
            "GET", f"{live}/v1/export", params={"format": "kto"}, headers=headers, timeout=120
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            assert "feedback-kto.jsonl" in response.headers["content-disposition"]
            last = b""
            for chunk in response.iter_bytes():
                total += len(chunk)
                chunks += 1
                lines += chunk.count(b"\n")
                last = (last + chunk)[-2 * output_chars :]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == rows and total > rows * output_chars
    assert json.loads(last.rsplit(b"\n", 2)[-2])["label"] is True  # whole lines, same format
    assert chunks > 10
    assert peak < total / 4, f"peak {peak / 2**20:.1f} MiB for {total / 2**20:.1f} MiB sent"


# --- The Idempotency-Key middleware checks the key first -----------------------------------------


def test_an_unknown_key_with_an_idempotency_key_gets_401_and_writes_nothing(
    client: TestClient, sessions: Sessions
) -> None:
    """Nothing is written for a key that is not one: the same 401 as without the header."""
    engine = app_state(client.app).sessions.kw["bind"]
    writes: list[str] = []

    def watch(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        table = IdempotencyRecord.__tablename__
        if table in statement and not statement.lstrip().startswith("SELECT"):
            writes.append(statement)

    event.listen(engine, "before_cursor_execute", watch)
    try:
        for token in ("flm_not-a-real-key", "x" * 40):
            headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "k1"}
            response = client.post("/v1/generate", json=PROMPT, headers=headers)
            assert response.status_code == 401, response.text
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json()["detail"] == "unknown or revoked API key"
    finally:
        event.remove(engine, "before_cursor_execute", watch)
    assert writes == []
    assert count(sessions, IdempotencyRecord) == 0
    assert count(sessions, Generation) == 0


def test_a_revoked_key_never_gets_a_replay(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """An answer kept for a key is not replayed once the key is revoked: 401 instead."""
    user = new_key(client, admin)
    me = client.get("/v1/keys/me", headers=user).json()
    headers = {**user, "Idempotency-Key": "before-revocation"}
    first = client.post("/v1/generate", json=PROMPT, headers=headers)
    assert first.status_code == 200
    assert client.delete(f"/v1/keys/{me['id']}", headers=admin).status_code == 204
    again = client.post("/v1/generate", json=PROMPT, headers=headers)
    assert again.status_code == 401, again.text
    assert "Idempotent-Replayed" not in again.headers
    assert first.json()["output"] not in again.text
    assert count(sessions, Generation) == 1


# --- Strict booleans ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 0, "true", "false", "yes", 1.0])
def test_a_boolean_must_be_a_json_boolean(
    client: TestClient, admin: Headers, sessions: Sessions, value: object
) -> None:
    """`stream: 1` is a 422, not a stream, with or without an Idempotency-Key (it cannot pass as
    true after the middleware let it by as not-true)."""
    requests = [
        ("/v1/generate", {**PROMPT, "stream": value}),
        ("/v1/qa", {"question": "Why?", "max_new_tokens": 2, "stream": value}),
        ("/v1/translate", {"text": "Hi", "target_lang": "fr", "stream": value}),
        ("/v1/chat/completions", {**CHAT, "stream": value}),
        ("/v1/completions", {"model": "default", "prompt": "Hi", "max_tokens": 2, "stream": value}),
        ("/v1/chat/completions", {**CHAT, "logprobs": value}),
    ]
    for extra in ({}, {"Idempotency-Key": f"strict-{value!r}"}):
        for path, body in requests:
            response = client.post(path, json=body, headers={**admin, **extra})
            assert response.status_code == 422, (path, body, response.text)
            assert "text/event-stream" not in response.headers.get("content-type", "")
    assert count(sessions, Generation) == 0
    assert count(sessions, IdempotencyRecord) == 0


def test_json_booleans_still_work(client: TestClient, admin: Headers) -> None:
    """true and false are what they always were."""
    off = client.post("/v1/generate", json={**PROMPT, "stream": False}, headers=admin)
    assert off.status_code == 200 and off.json()["output"] is not None
    on = client.post("/v1/generate", json={**PROMPT, "stream": True}, headers=admin)
    assert on.status_code == 200 and "event: done" in on.text
    chat = client.post("/v1/chat/completions", json={**CHAT, "logprobs": False}, headers=admin)
    assert chat.status_code == 200, chat.text


# --- Malformed and deeply nested bodies -----------------------------------------------------------


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


DEEP = [
    _nested(10_000),
    '{"prompt": ' + _nested(10_000, '"x"') + "}",
    '{"prompt": ' + _nested(900, '"x"') + "}",  # parses, then the error report recursed
    '{"prompt": "Hi", "a": ' + '{"b": ' * 5000 + "1" + "}" * 5000 + "}",
    '{"prompt": ' + _nested(MAX_JSON_DEPTH + 1, '"x"') + "}",
]


@pytest.mark.parametrize("body", DEEP, ids=["10000", "field-10000", "field-900", "obj", "limit"])
def test_deeply_nested_json_is_a_422_that_says_so(
    client: TestClient, admin: Headers, sessions: Sessions, body: str
) -> None:
    """Whatever the route and with or without an Idempotency-Key: never a 500."""
    for path in ("/v1/generate", "/v1/feedback", "/v1/keys", "/v1/chat/completions"):
        for extra in ({}, {"Idempotency-Key": "deep"}):
            response = client.post(path, content=body, headers={**admin, **JSON, **extra})
            assert response.status_code == 422, (path, response.status_code, response.text[:300])
            assert "nested too deeply" in response.json()["detail"][0]["msg"]
    assert count(sessions, IdempotencyRecord) == 0


MALFORMED = {
    "truncated": b'{"prompt": "Hi"',
    "not-utf8": b'{"prompt": "\xff\xfe"}',
    "trailing": b'{"prompt": "Hi"} x',
    "nan": b'{"prompt": "Hi", "temperature": NaN}',
    "infinity": b'{"prompt": "Hi", "temperature": -Infinity}',
    "huge-float": b'{"prompt": "Hi", "temperature": 1e999}',
    "huge-int": b'{"prompt": "Hi", "seed": ' + b"9" * 5000 + b"}",
    "bare-string": b'"Hi"',
    "array": b"[]",
    "null": b"null",
    "single-quotes": b"{'prompt': 'Hi'}",
    "control-char": b'{"prompt": "a\x01b"}',
    "lone-surrogate": b'{"prompt": "\\ud800"}',
    "nul-escape": b'{"prompt": "\\u0000"}',
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_any_malformed_body_is_a_clear_4xx(
    client: TestClient, admin: Headers, sessions: Sessions, body: bytes
) -> None:
    """Broken JSON, JSON that is not the request's object, and values JSON has not: each is a
    4xx with a message, on every kind of route, never a 500."""
    for path in ("/v1/generate", "/v1/feedback", "/v1/chat/completions", "/v1/keys"):
        for extra in ({}, {"Idempotency-Key": "malformed"}):
            response = client.post(path, content=body, headers={**admin, **JSON, **extra})
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
            detail = response.json()["detail"]
            assert detail and (isinstance(detail, str) or detail[0]["msg"]), response.text
    assert count(sessions, Generation) == 0


def test_json_depth_is_measured_without_recursion() -> None:
    """The depth check itself copes with any depth."""
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == MAX_JSON_DEPTH + 1  # stops counting past the limit
    assert json_depth({"a": [1, {"b": []}]}) == 4
    assert json_depth("x") == 0
