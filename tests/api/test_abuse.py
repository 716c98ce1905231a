"""Abuse: rate limits per API key, request body size, and retries with an Idempotency-Key."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, load_settings
from app.db import utcnow
from app.main import create_app
from app.models import ApiKey, Feedback, Generation, IdempotencyRecord
from app.services.idempotency import Caller, IdempotencyStore, Verdict, fingerprint
from app.services.ratelimit import RateLimits
from tests.helpers import REDIS_TEST_URL, IsolatedSettings

Sessions = sessionmaker[Session]
Headers = dict[str, str]
PROMPT = {"prompt": "Say hi.", "max_new_tokens": 4, "temperature": 1.0, "seed": 3}


@contextmanager
def app_with(settings: Settings, **changes: Any) -> Iterator[TestClient]:
    """The app started with some settings changed."""
    with TestClient(create_app(settings.model_copy(update=changes))) as client:
        yield client


def new_user(client: TestClient, admin: Headers) -> Headers:
    response = client.post("/v1/keys", json={"name": "someone", "role": "user"}, headers=admin)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


def count(sessions: Sessions, table: type[Any]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


# Rate limits


def test_generation_over_the_limit_gets_429_with_retry_after(
    settings: Settings, admin: Headers
) -> None:
    """The limit is per key and shared by every generating route, OpenAI's included."""
    with app_with(settings, rate_limit_generation="2/minute") as client:
        user = new_user(client, admin)
        assert client.post("/v1/generate", json=PROMPT, headers=user).status_code == 200
        qa = {"question": "Why?", "max_new_tokens": 4}
        assert client.post("/v1/qa", json=qa, headers=user).status_code == 200

        chat = {
            "model": "default",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
        }
        refused = client.post("/v1/chat/completions", json=chat, headers=user)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "2 per 1 minute" in refused.json()["detail"]
        assert "retry in" in refused.json()["detail"]
        assert refused.json()["error"]["code"] == 429  # OpenAI clients show this one
        assert client.post("/v1/generate", json=PROMPT, headers=user).status_code == 429

        # Another key has its own allowance; reads are not limited.
        assert client.post("/v1/generate", json=PROMPT, headers=admin).status_code == 200
        assert client.get("/v1/generations", headers=user).status_code == 200


def test_a_refused_key_is_told_again_without_its_request_being_read(
    settings: Settings, admin: Headers
) -> None:
    """Found by bench/abuse.py: a key retrying as fast as it could, each retry refused, took
    most of a core in body checks, parsing and authentication. Once refused with Retry-After, the
    same caller on the same route is refused again at once: the same body and status, before its
    request is read (a malformed body gets the 429, not a 422), and with a Retry-After that
    counts down; other keys and other routes are unaffected."""
    with app_with(settings, rate_limit_generation="1/minute") as client:
        user = new_user(client, admin)
        assert client.post("/v1/generate", json=PROMPT, headers=user).status_code == 200
        refused = client.post("/v1/generate", json=PROMPT, headers=user)
        assert refused.status_code == 429
        malformed = {"Content-Type": "application/json"}
        again = client.post("/v1/generate", content=b"{not json", headers={**user, **malformed})
        assert again.status_code == 429, again.text
        assert again.json() == refused.json()
        assert 1 <= int(again.headers["Retry-After"]) <= int(refused.headers["Retry-After"])
        assert again.headers["X-Content-Type-Options"] == "nosniff"  # still the app's headers
        # Not another caller, another route, or a retry carrying an Idempotency-Key.
        other = client.post("/v1/generate", content=b"{not json", headers={**admin, **malformed})
        assert other.status_code == 422
        assert client.get("/v1/generations", headers=user).status_code == 200
        keyed = {**user, "Idempotency-Key": str(uuid.uuid4())}
        assert client.post("/v1/generate", json=PROMPT, headers=keyed).status_code == 429


def test_feedback_has_its_own_limit(settings: Settings, admin: Headers, sessions: Sessions) -> None:
    """Ratings and comparisons count together against the feedback limit, not generation's."""
    with app_with(settings, rate_limit_feedback="1/minute") as client:
        user = new_user(client, admin)
        first = client.post("/v1/generate", json=PROMPT, headers=user).json()["id"]
        second = client.post("/v1/generate", json={**PROMPT, "seed": 4}, headers=user).json()["id"]
        rating = {"generation_id": first, "thumbs": "up"}
        assert client.post("/v1/feedback", json=rating, headers=user).status_code == 201
        choice = {"generation_a": first, "generation_b": second, "winner": "a"}
        refused = client.post("/v1/comparisons", json=choice, headers=user)
        assert refused.status_code == 429, refused.text
        assert "feedback" in refused.json()["detail"]
        assert refused.headers["Retry-After"].isdigit()
        assert count(sessions, Feedback) == 1


def test_limits_are_documented_in_the_schema(client: TestClient) -> None:
    """Each limited route lists its 429 in the OpenAPI schema, reads (RATE_LIMIT_READ) too."""
    paths = client.get("/openapi.json").json()["paths"]
    limited = ["/v1/generate", "/v1/translate", "/v1/qa", "/v1/chat/completions",
               "/v1/completions", "/v1/feedback", "/v1/comparisons"]  # fmt: skip
    for path in limited:
        assert "429" in paths[path]["post"]["responses"], path
    assert "429" in paths["/v1/generations"]["get"]["responses"]


def test_redis_shares_the_count_between_processes() -> None:
    """Two API processes on one Redis count the same key's requests together."""
    caller = uuid.uuid4().hex
    first = RateLimits({"feedback": "3/minute"}, REDIS_TEST_URL)
    second = RateLimits({"feedback": "3/minute"}, REDIS_TEST_URL)
    assert [first.hit("feedback", caller), second.hit("feedback", caller)] == [None, None]
    assert first.hit("feedback", caller) is None
    refusal = second.hit("feedback", caller)
    assert refusal is not None and refusal.limit == "3 per 1 minute"
    assert first.hit("feedback", uuid.uuid4().hex) is None  # another key


def test_unreachable_redis_lets_requests_through(
    settings: Settings, admin: Headers, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down the limits fail open: generation and ratings are still accepted."""
    caplog.set_level(logging.WARNING, logger="app.services.ratelimit")
    down = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with app_with(settings, redis_url=down, rate_limit_generation="1/minute") as client:
        for seed in (1, 2):
            answer = client.post("/v1/generate", json={**PROMPT, "seed": seed}, headers=admin)
            assert answer.status_code == 200, answer.text
        rating = {"generation_id": answer.json()["id"], "stars": 4}
        assert client.post("/v1/feedback", json=rating, headers=admin).status_code == 201
    assert "rate limits not enforced" in caplog.text


@pytest.mark.parametrize("value", ["12 per fortnight", "/minute", "lots"])
def test_a_malformed_limit_stops_the_process_with_one_line(
    value: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """RATE_LIMIT_* must be in the limits notation; the error names the setting and the form."""
    # load_settings reads the environment and `.env` as the process would: neither may hold a
    # setting here, or its own error could come first.
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        load_settings(rate_limit_feedback=value)
    line = capsys.readouterr().err
    assert line.startswith("invalid setting RATE_LIMIT_FEEDBACK:")
    assert "120/minute" in line


@pytest.mark.parametrize("value", ["", "none", "None"])
def test_a_limit_can_be_turned_off(value: str) -> None:
    """Empty or `none` means no limit."""
    assert IsolatedSettings(rate_limit_generation=value).rate_limit_generation is None


# Body size


def test_a_body_over_the_limit_gets_413(settings: Settings, admin: Headers) -> None:
    """Declared (Content-Length) or streamed without a length (chunked), a big body is refused."""
    big = json.dumps({"prompt": "x" * 3000}).encode()
    with app_with(settings, max_body_bytes=2048) as client:
        declared = client.post(
            "/v1/generate", content=big, headers={**admin, "Content-Type": "application/json"}
        )
        assert declared.status_code == 413
        assert "2048 bytes" in declared.json()["detail"]

        chunks = iter([big[:1000], big[1000:2000], big[2000:]])
        chunked = client.post(
            "/v1/feedback", content=chunks, headers={**admin, "Content-Type": "application/json"}
        )
        assert chunked.status_code == 413
        assert "2048 bytes" in chunked.json()["detail"]

        # With an Idempotency-Key the body is read earlier; still a 413.
        idempotent = {**admin, "Idempotency-Key": "big", "Content-Type": "application/json"}
        chunks = iter([big[:1000], big[1000:2000], big[2000:]])
        assert client.post("/v1/keys", content=chunks, headers=idempotent).status_code == 413

        small = client.post("/v1/generate", json=PROMPT, headers=admin)
        assert small.status_code == 200


def test_a_chunked_body_over_the_limit_gets_413_from_a_real_server(
    live: str, admin: Headers
) -> None:
    """Over real HTTP, with no Content-Length: the server refuses once the limit is passed."""

    def body() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(2048):
            yield b"x" * 1024
        yield b'"}'

    headers = {**admin, "Content-Type": "application/json"}
    response = httpx.post(f"{live}/v1/generate", content=body(), headers=headers, timeout=30)
    assert response.status_code == 413
    assert "1048576 bytes" in response.json()["detail"]


# Idempotency-Key


def test_a_retried_generation_is_replayed_not_generated_again(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """Same key, same body: the first response again, marked as a replay; one generation row."""
    headers = {**admin, "Idempotency-Key": "gen-1"}
    first = client.post("/v1/generate", json=PROMPT, headers=headers)
    again = client.post("/v1/generate", json=PROMPT, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert count(sessions, Generation) == 1

    chat = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    headers = {**admin, "Idempotency-Key": "chat-1"}
    first = client.post("/v1/chat/completions", json=chat, headers=headers)
    again = client.post("/v1/chat/completions", json=chat, headers=headers)
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert count(sessions, Generation) == 2


def test_a_retried_rating_gets_its_first_answer(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """Without the header a second rating is an update (200); with it, the replayed 201."""
    generation_id = client.post("/v1/generate", json=PROMPT, headers=admin).json()["id"]
    rating = {"generation_id": generation_id, "thumbs": "down"}
    headers = {**admin, "Idempotency-Key": str(uuid.uuid4())}
    first = client.post("/v1/feedback", json=rating, headers=headers)
    again = client.post("/v1/feedback", json=rating, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert client.post("/v1/feedback", json=rating, headers=admin).status_code == 200
    assert count(sessions, Feedback) == 1


def test_a_created_key_is_replayed_but_never_stored_in_clear(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """A retried key creation returns the same key, creates one, and keeps it only encrypted."""
    headers = {**admin, "Idempotency-Key": "new-key"}
    body = {"name": "carol", "role": "user"}
    first = client.post("/v1/keys", json=body, headers=headers)
    again = client.post("/v1/keys", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    plaintext = first.json()["key"]
    assert again.json()["key"] == plaintext
    with sessions() as session:
        assert session.scalar(select(func.count()).where(ApiKey.name == "carol")) == 1
        stored = session.scalars(select(IdempotencyRecord)).one()
    assert stored.body is not None
    assert plaintext.encode() not in stored.body
    assert plaintext.encode() not in json.dumps(stored.headers).encode()


def test_admin_actions_are_replayed_too(client: TestClient, admin: Headers) -> None:
    """Activating a version with a key twice answers the first activation again."""
    headers = {**admin, "Idempotency-Key": "activate-v0"}
    first = client.post("/v1/models/v0/activate", headers=headers)
    again = client.post("/v1/models/v0/activate", headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["Idempotent-Replayed"] == "true"


def test_the_same_key_for_another_request_is_refused(client: TestClient, admin: Headers) -> None:
    """A key names one request: another body under it is a 422 that says so."""
    headers = {**admin, "Idempotency-Key": "k"}
    assert client.post("/v1/generate", json=PROMPT, headers=headers).status_code == 200
    other = client.post("/v1/generate", json={**PROMPT, "seed": 9}, headers=headers)
    assert other.status_code == 422
    assert "different request" in other.json()["detail"]
    other_path = client.post("/v1/qa", json={"question": "Why?"}, headers=headers)
    assert other_path.status_code == 422


def test_keys_are_scoped_to_the_api_key(
    client: TestClient, admin: Headers, user: Headers, sessions: Sessions
) -> None:
    """Two callers using the same Idempotency-Key do not see each other's answers."""
    for caller in (admin, user):
        response = client.post(
            "/v1/generate", json=PROMPT, headers={**caller, "Idempotency-Key": "same"}
        )
        assert response.status_code == 200
        assert "Idempotent-Replayed" not in response.headers
    assert count(sessions, Generation) == 2


def test_a_request_still_in_flight_gets_409(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """While the first request with a key is being answered, a retry is told to wait."""
    body = json.dumps(PROMPT).encode()
    token = admin["Authorization"].removeprefix("Bearer ")
    store = IdempotencyStore(sessions)
    request = fingerprint("POST", path="/v1/generate", query=b"", body=body)
    claim = store.begin(Caller.of(token), key="slow", request_fingerprint=request)
    assert claim.verdict is Verdict.claimed
    headers = {**admin, "Idempotency-Key": "slow", "Content-Type": "application/json"}
    response = client.post("/v1/generate", content=body, headers=headers)
    assert response.status_code == 409
    assert "still being answered" in response.json()["detail"]
    assert response.headers["Retry-After"] == "1"
    assert count(sessions, Generation) == 0


def test_a_failed_request_is_not_kept(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """Only successes are kept: after an error the same key runs the request again."""
    headers = {**admin, "Idempotency-Key": "retry-me"}
    rating = {"generation_id": 1, "thumbs": "up"}
    missing = client.post("/v1/feedback", json=rating, headers=headers)
    assert missing.status_code == 404
    assert count(sessions, IdempotencyRecord) == 0
    client.post("/v1/generate", json=PROMPT, headers=admin)  # now generation 1 exists
    assert client.post("/v1/feedback", json=rating, headers=headers).status_code == 201


def test_a_kept_answer_expires_after_a_day(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """Past its 24 hours a key is free again: the request runs anew."""
    headers = {**admin, "Idempotency-Key": "old"}
    assert client.post("/v1/generate", json=PROMPT, headers=headers).status_code == 200
    with sessions() as session:
        record = session.scalars(select(IdempotencyRecord)).one()
        assert timedelta(hours=23) < record.expires_at - utcnow() <= timedelta(hours=24)
        session.execute(
            update(IdempotencyRecord).values(expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    again = client.post("/v1/generate", json=PROMPT, headers=headers)
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert count(sessions, Generation) == 2


def test_streaming_with_a_key_is_refused(client: TestClient, admin: Headers) -> None:
    """A stream cannot be replayed, so `stream: true` with the header is a 422 that says so."""
    chat = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    response = client.post(
        "/v1/chat/completions", json=chat, headers={**admin, "Idempotency-Key": "s"}
    )
    assert response.status_code == 422
    assert "stream" in response.json()["detail"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "naïve"])
def test_a_malformed_key_is_refused(client: TestClient, admin: Headers, key: str) -> None:
    """The header must be 1-255 printable ASCII characters."""
    headers: dict[str, str | bytes] = {**admin, "Idempotency-Key": key.encode()}
    response = client.post("/v1/generate", json=PROMPT, headers=headers)
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["detail"]
