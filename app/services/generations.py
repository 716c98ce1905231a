"""Generating answers for the three tasks, recording each, and reading them back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any, TypeVar

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from app.ml.engine import (
    Completion,
    Engine,
    EngineBusy,
    GenerationStream,
    PromptTooLong,
    SamplingParams,
)
from app.ml.registry import ServingVersion
from app.models import Feedback, Generation, ModelVersion, Task
from app.services.errors import Busy, ClientGone, InvalidInput, NotFound
from app.services.prompts import language_name, user_message

T = TypeVar("T")

# The field a too-long input is reported on, per task.
_MAIN_FIELD = {
    Task.generate: "prompt", Task.translate: "text", Task.qa: "question",
    Task.chat: "messages", Task.completion: "prompt",
}  # fmt: skip


def input_hash(task: Task, data: dict[str, Any]) -> str:
    """Identifies a task and its input; answers to the same question share it."""
    canonical = json.dumps({"task": task.value, "input": data}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _validate(task: Task, data: dict[str, Any], max_chars: int) -> None:
    if task is Task.translate:
        for field in ("target_lang", "source_lang"):
            code = data.get(field)
            if code is not None and language_name(code) is None:
                raise InvalidInput(field, f"{code!r} is not an ISO 639-1 language code (e.g. 'fr')")
    texts = [m["content"] for m in data["messages"]] if task is Task.chat else data.values()
    length = sum(len(value) for value in texts if isinstance(value, str))
    if length > max_chars:
        raise InvalidInput(
            _MAIN_FIELD[task],
            f"the input is {length} characters; the limit is {max_chars} (MAX_PROMPT_CHARS)",
        )


def _render(engine: Engine, task: Task, data: dict[str, Any]) -> Callable[[ServingVersion], str]:
    """How a task's input becomes the exact prompt text for a version."""
    if task is Task.completion:
        return lambda _: str(data["prompt"])
    if task is Task.chat:
        return lambda version: engine.chat_prompt(list(data["messages"]), version)
    return lambda version: engine.chat_prompt(user_message(task, data), version)


def start_generation(
    engine: Engine,
    *,
    task: Task,
    data: dict[str, Any],
    params: SamplingParams,
    max_chars: int,
    version_lease: AbstractContextManager[ServingVersion] | None = None,
    owner: int | None = None,
) -> tuple[GenerationStream, str]:
    """Validate the input and queue it; the stream of the answer and the exact prompt.

    The request holds its version (by default the active one) from rendering to the last
    token: a swap meanwhile neither changes nor recycles it.
    """
    _validate(task, data, max_chars)
    try:
        return engine.submit(_render(engine, task, data), params, version_lease, owner=owner)
    except PromptTooLong as exc:
        raise InvalidInput(_MAIN_FIELD[task], str(exc)) from None
    except EngineBusy as exc:
        raise Busy(str(exc)) from None


def record_generation(
    session: Session,
    *,
    api_key_id: int,
    task: Task,
    data: dict[str, Any],
    prompt: str,
    params: SamplingParams,
    completion: Completion,
) -> Generation:
    """Store one answer with its exact prompt, parameters and version."""
    generation = Generation(
        task=task,
        input=data,
        input_hash=input_hash(task, data),
        prompt=prompt,
        params={k: v for k, v in asdict(params).items() if k != "stop" or v},  # stop: when set
        output=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        latency_ms=completion.latency_ms,
        model_version_id=completion.version.id,
        api_key_id=api_key_id,
    )
    session.add(generation)
    session.commit()
    return generation


def recorder(
    sessions: Callable[[], Session],
    then: Callable[[Generation], T],
    *,
    api_key_id: int,
    task: Task,
    data: dict[str, Any],
    prompt: str,
    params: SamplingParams,
) -> Callable[[Completion], T]:
    """Records a streamed answer in a session of its own (a stream outlives the request's),
    and returns `then(row)`, made while that session is open."""

    def record(completion: Completion) -> T:
        with sessions() as session:
            row = record_generation(
                session, api_key_id=api_key_id, task=task, data=data, prompt=prompt,
                params=params, completion=completion,
            )  # fmt: skip
            return then(row)

    return record


def gone(row_id: int) -> ClientGone:
    """The error for a generation whose client went away (it was recorded as cancelled)."""
    return ClientGone(f"the client went away; generation {row_id} was recorded as cancelled")


def wait_for(
    stream: GenerationStream, *, disconnected: Callable[[], bool] | None = None
) -> Completion:
    """The whole answer; a client that goes away meanwhile cancels it (the partial answer is
    still returned, to be recorded, with finish_reason `cancelled`)."""
    while disconnected is not None:
        try:
            return stream.result(timeout=DISCONNECT_POLL)
        except TimeoutError:
            if disconnected():
                stream.cancel()
                break
    return stream.result()


DISCONNECT_POLL = 0.25
"""Seconds between checks that the client of a non-streamed generation is still there."""


def release_connection(session: Session) -> None:
    """End the session's read transaction, so no pooled connection is held while the model
    generates (seconds; more concurrent requests than the pool has connections)."""
    session.commit()


def create_generation(
    session: Session,
    engine: Engine,
    *,
    api_key_id: int,
    task: Task,
    data: dict[str, Any],
    params: SamplingParams,
    max_chars: int,
    version_lease: AbstractContextManager[ServingVersion] | None = None,
    disconnected: Callable[[], bool] | None = None,
) -> Generation:
    """Run the model on one task input, wait for the answer and record it; a client that goes
    away meanwhile cancels it: what was generated is recorded as `cancelled`, then ClientGone."""
    stream, prompt = start_generation(
        engine, task=task, data=data, params=params, max_chars=max_chars,
        version_lease=version_lease, owner=api_key_id,
    )  # fmt: skip
    release_connection(session)
    row = record_generation(
        session, api_key_id=api_key_id, task=task, data=data, prompt=prompt, params=params,
        completion=wait_for(stream, disconnected=disconnected),
    )  # fmt: skip
    if row.finish_reason == "cancelled":
        raise gone(row.id)
    return row


def get_generation(
    session: Session, generation_id: int, *, owner_id: int | None = None
) -> Generation:
    """One generation by id; with `owner_id`, only if that key asked for it (another key's is
    reported as missing, so that ids say nothing about other keys' traffic)."""
    generation = session.get(Generation, generation_id)
    if generation is None or (owner_id is not None and generation.api_key_id != owner_id):
        raise NotFound(f"generation {generation_id} does not exist")
    return generation


def list_generations(
    session: Session,
    *,
    task: Task | None = None,
    model_version: str | None = None,
    rated: bool | None = None,
    limit: int = 20,
    before_id: int | None = None,
    owner_id: int | None = None,
) -> tuple[list[Generation], int | None]:
    """Generations newest first, and the id to page on from (None on the last page); with
    `owner_id`, only those that key asked for."""
    if model_version is not None and "\x00" in model_version:
        return [], None  # no version's name holds NUL, which PostgreSQL cannot compare
    query = select(Generation).order_by(Generation.id.desc()).limit(limit + 1)
    if owner_id is not None:
        query = query.where(Generation.api_key_id == owner_id)
    if task is not None:
        query = query.where(Generation.task == task)
    if model_version is not None:
        query = query.join(ModelVersion).where(ModelVersion.name == model_version)
    if rated is not None:
        has_feedback = exists().where(Feedback.generation_id == Generation.id)
        query = query.where(has_feedback if rated else ~has_feedback)
    if before_id is not None:
        query = query.where(Generation.id < before_id)
    rows = list(session.scalars(query))
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None
