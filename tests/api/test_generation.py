"""Generation endpoints: answers, what is recorded, reading it back, and bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.models import Generation

SHORT = {"max_new_tokens": 8}


def count_generations(sessions: Any) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Generation)))


@pytest.mark.parametrize(
    ("path", "body", "input_fields"),
    [
        ("/v1/generate", {"prompt": "Say hello."}, {"prompt": "Say hello."}),
        (
            "/v1/translate",
            {"text": "Good morning", "target_lang": "fr", "source_lang": "EN"},
            {"text": "Good morning", "target_lang": "fr", "source_lang": "en"},
        ),
        (
            "/v1/qa",
            {"question": "Who wrote it?", "context": "Hugo wrote Les Misérables."},
            {"question": "Who wrote it?", "context": "Hugo wrote Les Misérables."},
        ),
    ],
)
def test_each_task_answers_and_is_recorded(
    client: TestClient, user: dict[str, str], sessions: Any, path: str, body: dict[str, Any],
    input_fields: dict[str, Any],
) -> None:  # fmt: skip
    """A task answers with output, version, usage and its input, and the row holds all of it."""
    response = client.post(path, json={**body, **SHORT, "seed": 1}, headers=user)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["task"] == path.rsplit("/", 1)[1]
    assert data["model_version"] == "v0"
    assert 1 <= data["usage"]["completion_tokens"] <= 8
    assert data["usage"]["prompt_tokens"] > 0
    assert data["input"] == input_fields
    for field, value in input_fields.items():
        assert data[field] == value
    with sessions() as session:
        row = session.get(Generation, data["id"])
        assert row is not None
        assert row.output == data["output"]
        assert row.input == input_fields
        assert row.params == {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.95, "seed": 1}
        assert row.version.name == "v0"
        assert row.latency_ms >= 0
        assert row.prompt.startswith("<|im_start|>")  # the chat template was applied
        assert row.prompt.endswith("<|im_start|>assistant\n")
        key_id = row.api_key_id
    keys = client.get("/v1/keys", headers={"Authorization": "Bearer test-admin-key-0123456789"})
    assert {k["id"]: k["name"] for k in keys.json()}[key_id] == "rater"


def test_prompt_wording_per_task(client: TestClient, user: dict[str, str]) -> None:
    """Translation names both languages; QA puts the context before the question."""
    translated = client.post(
        "/v1/translate", json={"text": "Hi", "target_lang": "de", "source_lang": "es", **SHORT},
        headers=user,
    ).json()  # fmt: skip
    assert "from Spanish to German" in translated["model_prompt"]
    answered = client.post(
        "/v1/qa", json={"question": "Q?", "context": "C.", **SHORT}, headers=user
    ).json()
    prompt = answered["model_prompt"]
    assert prompt.index("Context:\nC.") < prompt.index("Question: Q?")


def test_same_seed_same_answer(client: TestClient, user: dict[str, str]) -> None:
    """Sampling with a seed is reproducible; a greedy answer is too."""
    body = {"prompt": "Tell me a story.", "max_new_tokens": 12, "temperature": 1.0, "seed": 7}
    first = client.post("/v1/generate", json=body, headers=user).json()["output"]
    second = client.post("/v1/generate", json=body, headers=user).json()["output"]
    assert first == second


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/generate", {"prompt": ""}, "prompt"),
        ("/v1/generate", {"prompt": "   \n"}, "prompt"),
        ("/v1/generate", {}, "prompt"),
        ("/v1/generate", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ("/v1/generate", {"prompt": "x", "max_new_tokens": 1025}, "max_new_tokens"),
        ("/v1/generate", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/generate", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/generate", {"prompt": "x", "seed": -1}, "seed"),
        ("/v1/generate", {"prompt": "x", "max_new_tokens": "many"}, "max_new_tokens"),
        ("/v1/generate", {"prompt": "x", "tempreature": 0.5}, "tempreature"),
        ("/v1/generate", {"prompt": ["x"]}, "prompt"),
        ("/v1/generate", {"prompt": "x" * 2001}, "prompt"),
        ("/v1/translate", {"text": "Hi", "target_lang": "xx"}, "target_lang"),
        ("/v1/translate", {"text": "Hi", "target_lang": "fra"}, "target_lang"),
        ("/v1/translate", {"text": "Hi", "target_lang": "fr", "source_lang": "q1"}, "source_lang"),
        ("/v1/translate", {"text": "Hi"}, "target_lang"),
        ("/v1/qa", {"question": "Q?", "context": "c" * 2000}, "question"),
    ],
)
def test_bad_input_is_a_clear_422_and_writes_nothing(
    client: TestClient, user: dict[str, str], sessions: Any, path: str, body: dict[str, Any],
    field: str,
) -> None:  # fmt: skip
    """Each bad field is named in a 422, and no generation is recorded."""
    response = client.post(path, json=body, headers=user)
    assert response.status_code == 422, response.text
    details = response.json()["detail"]
    assert any(d["loc"][-1] == field for d in details), details
    assert all(d["msg"] for d in details)
    assert count_generations(sessions) == 0


def test_prompt_longer_than_the_context_is_refused(
    client: TestClient, user: dict[str, str], sessions: Any
) -> None:
    """Within the character limit but beyond the model's 512-token context: 422 naming prompt."""
    body = {"prompt": "word " * 390, "max_new_tokens": 200}
    response = client.post("/v1/generate", json=body, headers=user)
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "prompt"]
    assert "context of 512 tokens" in detail["msg"]
    assert count_generations(sessions) == 0


def test_malformed_json_is_a_4xx(client: TestClient, user: dict[str, str]) -> None:
    """A body that is not JSON is refused with a message, not a 500."""
    response = client.post(
        "/v1/generate", content=b"{not json", headers={**user, "content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in str(response.json()["detail"])


def test_read_back_one_generation(client: TestClient, user: dict[str, str]) -> None:
    """GET /v1/generations/{id} returns the recorded generation; an unknown id is 404."""
    created = client.post("/v1/generate", json={"prompt": "Hi", **SHORT}, headers=user).json()
    fetched = client.get(f"/v1/generations/{created['id']}", headers=user)
    assert fetched.status_code == 200
    assert fetched.json()["output"] == created["output"]
    assert fetched.json()["model_prompt"] == created["model_prompt"]
    missing = client.get("/v1/generations/999999", headers=user)
    assert missing.status_code == 404
    assert "999999" in missing.json()["detail"]


def test_list_filters_and_pages_newest_first(client: TestClient, user: dict[str, str]) -> None:
    """Filter by task, version and rated; pages follow the cursor without gaps or repeats."""
    ids = []
    for i in range(5):
        ids.append(
            client.post("/v1/generate", json={"prompt": f"p{i}", **SHORT}, headers=user).json()[
                "id"
            ]
        )
    qa_id = client.post("/v1/qa", json={"question": "q", **SHORT}, headers=user).json()["id"]
    client.post("/v1/feedback", json={"generation_id": ids[1], "thumbs": "up"}, headers=user)

    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"task": "generate", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/generations", params=params, headers=user).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)

    everything = client.get("/v1/generations", headers=user).json()["items"]
    assert [g["id"] for g in everything] == [qa_id, *sorted(ids, reverse=True)]
    rated = client.get("/v1/generations", params={"rated": "true"}, headers=user).json()["items"]
    assert [g["id"] for g in rated] == [ids[1]]
    unrated = client.get("/v1/generations", params={"rated": False}, headers=user).json()["items"]
    assert ids[1] not in [g["id"] for g in unrated] and len(unrated) == 5
    by_version = client.get("/v1/generations", params={"model_version": "v0"}, headers=user)
    assert len(by_version.json()["items"]) == 6
    other = client.get("/v1/generations", params={"model_version": "v9"}, headers=user)
    assert other.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 101}, {"task": "poetry"}, {"cursor": "abc"}, {"rated": "maybe"}],
)
def test_list_rejects_bad_query(
    client: TestClient, user: dict[str, str], params: dict[str, Any]
) -> None:
    """Bad query parameters are named in a 422."""
    response = client.get("/v1/generations", params=params, headers=user)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", next(iter(params))]


def sse_events(lines: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a server-sent event stream."""
    events, name = [], "message"
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            name = "message"
    return events


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"prompt": "Count to ten."}),
        ("/v1/translate", {"text": "Good morning", "target_lang": "fr"}),
        ("/v1/qa", {"question": "Who wrote it?", "context": "Hugo wrote it."}),
    ],
)
def test_native_endpoints_stream_the_answer_and_end_with_the_record(
    client: TestClient, user: dict[str, str], sessions: Any, path: str, body: dict[str, Any]
) -> None:
    """`stream: true`: the deltas add up to the answer; `done` is the non-streamed response."""
    request = {**body, "stream": True, "max_new_tokens": 24, "temperature": 0}
    with client.stream("POST", path, json=request, headers=user) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    kinds = [name for name, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"delta"} and len(kinds) > 2
    done = events[-1][1]
    assert "".join(data["text"] for _, data in events[:-1]) == done["output"]
    with sessions() as session:
        stored = session.get(Generation, done["id"])
        assert stored is not None and stored.output == done["output"]
    # The same request unstreamed gives the same object (greedy), apart from id and timing.
    plain = client.post(path, json={**request, "stream": False}, headers=user).json()
    for field in ("output", "task", "input", "usage", "finish_reason", "model_version", "params"):
        assert plain[field] == done[field], field
    assert count_generations(sessions) == 2


def test_a_bad_streamed_request_gets_the_usual_error_not_a_stream(
    client: TestClient, user: dict[str, str], sessions: Any
) -> None:
    """Validation happens before the stream starts: a 422 with the field, nothing recorded."""
    request = {"text": "Hello", "target_lang": "zz", "stream": True}
    response = client.post("/v1/translate", json=request, headers=user)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "target_lang"
    assert count_generations(sessions) == 0
