"""Generating answers for the three tasks, recording each, and reading them back."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from app.ml.engine import Engine, PromptTooLong, SamplingParams
from app.ml.registry import ServingVersion
from app.models import Feedback, Generation, ModelVersion, Task
from app.services.errors import InvalidInput, NotFound
from app.services.prompts import language_name, user_message

# The field a too-long input is reported on, per task.
_MAIN_FIELD = {Task.generate: "prompt", Task.translate: "text", Task.qa: "question"}


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
    length = sum(len(value) for value in data.values() if isinstance(value, str))
    if length > max_chars:
        raise InvalidInput(
            _MAIN_FIELD[task],
            f"the input is {length} characters; the limit is {max_chars} (MAX_PROMPT_CHARS)",
        )


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
) -> Generation:
    """Run the model on one task input and record the generation.

    `version_lease` holds the version to use; by default the active one is leased.
    """
    _validate(task, data, max_chars)
    # One lease: a swap while this request runs does not change or recycle its version.
    with version_lease or engine.registry.lease() as version:
        prompt = engine.chat_prompt(user_message(task, data), version)
        started = time.perf_counter()
        try:
            completion = engine.generate(prompt, params, version)
        except PromptTooLong as exc:
            raise InvalidInput(_MAIN_FIELD[task], str(exc)) from None
    generation = Generation(
        task=task,
        input=data,
        input_hash=input_hash(task, data),
        prompt=prompt,
        params=asdict(params),
        output=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        latency_ms=round((time.perf_counter() - started) * 1000),
        model_version_id=completion.version.id,
        api_key_id=api_key_id,
    )
    session.add(generation)
    session.commit()
    return generation


def get_generation(session: Session, generation_id: int) -> Generation:
    """One generation by id."""
    generation = session.get(Generation, generation_id)
    if generation is None:
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
) -> tuple[list[Generation], int | None]:
    """Generations newest first, and the id to page on from (None on the last page)."""
    query = select(Generation).order_by(Generation.id.desc()).limit(limit + 1)
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
