"""Generating answers for the three tasks, recording each, and reading them back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from app.engine.chat import chat_prompt
from app.engine.registry import ServingVersion
from app.engine.requests import (
    Completion,
    EngineBusy,
    GenerationStream,
    PromptTooLong,
    SamplingParams,
)
from app.engine.scheduler import Engine
from app.models import ApiKey, Feedback, Generation, ModelVersion, Role, Task
from app.services.errors import Busy, ClientGone, Forbidden, InvalidInput, NotFound
from app.services.hotswap import VersionFollower
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


def _prompt(task: Task, data: dict[str, Any], version: ServingVersion) -> str:
    """The exact prompt text for a task's input on `version`, by its chat template (a
    completion's prompt goes to the model as is)."""
    if task is Task.completion:
        return str(data["prompt"])
    if task is Task.chat:
        return chat_prompt(version.tokenizer, list(data["messages"]))
    return chat_prompt(version.tokenizer, user_message(task, data))


def choose_version(
    session: Session,
    *,
    follower: VersionFollower,
    key: ApiKey,
    name: str | None,
    field: str = "model_version",
) -> AbstractContextManager[ServingVersion] | None:
    """The version a request names, to lease: None (the active one) when it names none.

    Only admins name a version (to compare them); else Forbidden. OpenAI's `model` field also
    takes `default` and the active version's name, which anyone may send.
    """
    if name is None:
        return None
    if field == "model":
        if name in ("default", follower.registry.active.name):
            return None
        if key.role is not Role.admin:
            raise Forbidden(
                f"model {name!r}: only admins choose a version other than the active one; "
                "use 'default'"
            )
    elif key.role is not Role.admin:
        raise Forbidden(
            f"choosing {field} needs an admin key; leave it out to use the active version"
        )
    return follower.lease_by_name(session, name)


def queue_generation(
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
        # Refused before the version is leased and the prompt rendered and tokenized (see
        # Engine.check_admission): refusing a flooding key must cost next to nothing.
        engine.check_admission(owner)
        with engine.lease(version_lease) as lease:
            prompt = _prompt(task, data, lease.version)
            return engine.submit(lease, prompt, params, owner=owner), prompt
    except PromptTooLong as exc:
        raise InvalidInput(_MAIN_FIELD[task], str(exc)) from None
    except EngineBusy as exc:
        raise Busy(str(exc)) from None


@dataclass(frozen=True)
class StartedGeneration:
    """A generation queued on the engine: stream its answer and `record` it, or `wait`."""

    stream: GenerationStream
    prompt: str
    """The exact text the model runs on."""
    task: Task
    data: dict[str, Any]
    params: SamplingParams
    api_key_id: int
    sessions: Callable[[], Session]
    """Sessions to record in: a streamed answer outlives the request's session."""

    @property
    def version(self) -> ServingVersion:
        """The version the request holds until its last token."""
        return self.stream.version

    def record(self, completion: Completion, then: Callable[[Generation], T]) -> T:
        """Store the answer in a session of its own, and return `then(row)`, made while that
        session is open."""
        with self.sessions() as session:
            row = record_generation(
                session, api_key_id=self.api_key_id, task=self.task, data=self.data,
                prompt=self.prompt, params=self.params, completion=completion,
            )  # fmt: skip
            return then(row)

    def wait(
        self, then: Callable[[Generation], T], *, disconnected: Callable[[], bool] | None = None
    ) -> T:
        """The whole answer, recorded, and `then(row)`; a client that goes away meanwhile
        cancels it: what was generated is recorded as `cancelled`, then ClientGone."""
        completion = wait_for(self.stream, disconnected=disconnected)
        row_id, answer = self.record(completion, lambda row: (row.id, then(row)))
        if completion.finish_reason == "cancelled":
            raise gone(row_id)
        return answer


def start_generation(
    session: Session,
    *,
    engine: Engine,
    follower: VersionFollower,
    sessions: Callable[[], Session],
    key: ApiKey,
    task: Task,
    data: dict[str, Any],
    params: SamplingParams,
    max_chars: int,
    model_version: str | None = None,
    version_field: str = "model_version",
) -> StartedGeneration:
    """Run one generation for any route, streamed or not: the version the request names (see
    `choose_version`; `version_field` is the field it came in), the input validated and
    queued, the request's database connection released. Then stream `.stream` and `.record`
    the answer, or `.wait` for it recorded."""
    lease = choose_version(
        session, follower=follower, key=key, name=model_version, field=version_field
    )
    stream, prompt = queue_generation(
        engine, task=task, data=data, params=params, max_chars=max_chars, version_lease=lease,
        owner=key.id,
    )  # fmt: skip
    release_connection(session)  # a stream can outlive the pool's patience
    return StartedGeneration(stream, prompt, task, data, params, key.id, sessions)


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


def get_generation(
    session: Session, *, generation_id: int, owner_id: int | None = None
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
