"""The OpenAI-compatible endpoints, through the official `openai` client against a live server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from sqlalchemy import select

from app.config import Settings
from app.models import Generation, Task
from app.state import app_state
from tests.helpers import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def client(live: str) -> OpenAI:  # type: ignore[override]
    """The official client, pointed at this service with the admin key."""
    return OpenAI(base_url=f"{live}/v1", api_key=ADMIN_KEY, max_retries=0)


def row(sessions: Any, generation_id: int) -> Generation:
    with sessions() as session:
        generation = session.get(Generation, generation_id)
        assert generation is not None
        session.expunge(generation)
        return generation


def test_chat_completion_is_recorded_and_can_be_rated(
    client: OpenAI, live: str, sessions: Any
) -> None:
    """A chat completion in OpenAI's shape; its generation_id rates it like any other."""
    answer = client.chat.completions.create(
        model="default",
        messages=HELLO,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    generation_id = answer.model_extra["generation_id"]  # type: ignore[index]
    stored = row(sessions, generation_id)
    assert answer.object == "chat.completion" and answer.model == "v0"
    assert answer.system_fingerprint == "fp_v0_float32"  # the version and its dtype
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == stored.output
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert answer.usage.completion_tokens == stored.completion_tokens
    assert answer.usage.total_tokens == stored.prompt_tokens + stored.completion_tokens
    assert stored.task is Task.chat and stored.input == {"messages": HELLO}
    assert "Say hello." in stored.prompt and stored.prompt.startswith("<|im_start|>")
    rating = {"generation_id": generation_id, "thumbs": "up"}
    assert httpx.post(f"{live}/v1/feedback", json=rating, headers=ADMIN).status_code == 201


def test_completion_uses_the_prompt_as_is(client: OpenAI, sessions: Any) -> None:
    """Text completions get no chat template; OpenAI's default length is 16 tokens. The same
    seed gives the same answer again, under the same system_fingerprint."""
    answer = client.completions.create(model="default", prompt="Once upon a time", seed=3)
    stored = row(sessions, answer.model_extra["generation_id"])  # type: ignore[index]
    assert answer.object == "text_completion"
    assert answer.choices[0].text == stored.output
    assert stored.task is Task.completion and stored.prompt == "Once upon a time"
    assert stored.completion_tokens <= 16 and stored.params["seed"] == 3
    again = client.completions.create(model="default", prompt="Once upon a time", seed=3)
    assert again.choices[0].text == answer.choices[0].text
    assert again.system_fingerprint == answer.system_fingerprint == "fp_v0_float32"


def test_streams_add_up_to_the_recorded_answer(client: OpenAI, sessions: Any) -> None:
    """Streaming chat and completions: the deltas are the answer; the last chunk says its id."""
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=HELLO,
            max_tokens=24,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.system_fingerprint for c in chunks} == {"fp_v0_float32"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    stored = row(sessions, last.model_extra["generation_id"])  # type: ignore[index]
    assert text == stored.output and len(chunks) > 3
    assert last.usage is not None and last.usage.completion_tokens == stored.completion_tokens

    pieces = list(
        client.completions.create(model="default", prompt="The sea", max_tokens=12, stream=True)
    )
    stored = row(sessions, pieces[-1].model_extra["generation_id"])  # type: ignore[index]
    assert "".join(p.choices[0].text for p in pieces) == stored.output


def test_stop_strings_end_the_answer_before_them(client: OpenAI) -> None:
    """With `stop`, the answer is what came before the first stop string, streamed or not."""
    free = (
        client.completions.create(model="default", prompt="Numbers:", max_tokens=40, temperature=0)
        .choices[0]
        .text
    )
    stop = free[10:13]
    expected = free[: free.find(stop)]
    cut = client.completions.create(
        model="default", prompt="Numbers:", max_tokens=40, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="default", prompt="Numbers:", max_tokens=40, temperature=0, stop=stop, stream=True
    )
    assert "".join(p.choices[0].text for p in streamed) == expected


def test_models_are_listed_the_openai_way(client: OpenAI) -> None:
    """`client.models.list()` works; each entry also carries the version's fields."""
    listed = client.models.list().data
    assert [m.id for m in listed] == ["v0"]
    assert listed[0].object == "model" and listed[0].model_extra["status"] == "active"  # type: ignore[index]


def test_clear_errors(client: OpenAI, live: str) -> None:
    """Unsupported or wrong requests are 4xx with a message, through the client's exceptions."""
    with pytest.raises(openai.UnprocessableEntityError, match="less than or equal to 1"):
        client.chat.completions.create(model="default", messages=HELLO, n=2)  # type: ignore[arg-type]
    with pytest.raises(openai.UnprocessableEntityError, match="last message must be the user"):
        client.chat.completions.create(
            model="default", messages=[{"role": "assistant", "content": "Hi"}]
        )
    with pytest.raises(openai.NotFoundError, match="v9"):
        client.completions.create(model="v9", prompt="Hi")
    key = httpx.post(f"{live}/v1/keys", json={"name": "u", "role": "user"}, headers=ADMIN)
    user = OpenAI(base_url=f"{live}/v1", api_key=key.json()["key"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="only admins"):
        user.completions.create(model="v9", prompt="Hi")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{live}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.fixture
def paused(client: OpenAI, live: str) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Pauses the first forward pass of the next generation until `proceed` is set."""
    from app.engine.registry import ModelRegistry

    registry: ModelRegistry = app_state(live_app(live)).registry
    started, proceed = threading.Event(), threading.Event()

    def pause(module: torch.nn.Module, args: Any) -> None:
        if not started.is_set():
            started.set()
            assert proceed.wait(60)

    hook = registry.active.model.get_input_embeddings().register_forward_pre_hook(pause)
    yield started, proceed
    proceed.set()
    hook.remove()


def live_app(live: str) -> Any:
    from tests.helpers import LIVE_APPS

    return LIVE_APPS[live]


def test_a_client_that_disconnects_cancels_its_request(
    live: str, sessions: Any, paused: tuple[threading.Event, threading.Event]
) -> None:
    """Closing a stream stops its generation early, frees the engine, and keeps the record."""
    started, proceed = paused
    body = {"model": "default", "prompt": "Count:", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{live}/v1/completions", json=body, headers=ADMIN) as response:
        assert response.status_code == 200
        assert started.wait(30)
    proceed.set()  # the client has gone; generation resumes and must notice

    def cancelled() -> Generation | None:
        with sessions() as session:
            return session.scalar(select(Generation).where(Generation.task == Task.completion))

    import time

    deadline = time.monotonic() + 30
    while (stored := cancelled()) is None:
        assert time.monotonic() < deadline, "the cancelled answer was not recorded"
        time.sleep(0.1)
    assert stored.finish_reason == "cancelled" and stored.completion_tokens < 400
    quick = httpx.post(
        f"{live}/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 2},
        headers=ADMIN, timeout=30,
    )  # fmt: skip
    assert quick.status_code == 200


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A queue of one waiting request, so that the test can fill it."""
    return settings.model_copy(update={"max_waiting_requests": 1})


def test_a_full_queue_answers_429_with_retry_after(
    live: str, paused: tuple[threading.Event, threading.Event]
) -> None:
    """One request runs (paused), one waits; the next is refused at once, not queued."""
    started, proceed = paused
    body = {"model": "default", "prompt": "Hi", "max_tokens": 2}
    results: list[int] = []

    def send() -> None:
        response = httpx.post(f"{live}/v1/completions", json=body, headers=ADMIN, timeout=60)
        results.append(response.status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]
    threads[0].start()
    assert started.wait(30)
    threads[1].start()
    import time

    deadline = time.monotonic() + 10
    while app_state(live_app(live)).engine.waiting < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    refused = httpx.post(f"{live}/v1/completions", json=body, headers=ADMIN, timeout=10)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "waiting" in refused.json()["detail"]
    proceed.set()
    for thread in threads:
        thread.join(60)
    assert results == [200, 200]
