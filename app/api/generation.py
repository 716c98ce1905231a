"""Generation endpoints and reading recorded generations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from app.api.streaming import documented_stream, event_stream, sse
from app.deps import (
    RATE_LIMITED,
    CurrentKey,
    Generating,
    GeneratingDep,
    GenerationLimit,
    SessionDep,
)
from app.models import Generation, Task
from app.schemas.generation import (
    GenerateRequest,
    GenerateResponse,
    GenerationPage,
    GenerationPublic,
    QARequest,
    QAResponse,
    TranslateRequest,
    TranslateResponse,
)
from app.services import generations
from app.services.errors import InvalidInput
from app.services.keys import visible_owner

router = APIRouter(prefix="/v1", tags=["generation"])
MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns; a larger one is a 422, not a database error


STREAM_DOC = documented_stream('event: delta\ndata: {"text": "Hel"}\n\n')


def _answer(
    task: Task,
    body: GenerateRequest | TranslateRequest | QARequest,
    ctx: Generating,
    respond: Callable[[GenerationPublic, dict[str, Any]], BaseModel],
) -> Any:
    """Generate and record; the response `respond` makes, or its events when streaming."""
    run = generations.start_generation(
        ctx.session, engine=ctx.engine, follower=ctx.follower, sessions=ctx.sessions,
        key=ctx.key, task=task, data=body.task_input(), params=body.sampling(),
        max_chars=ctx.settings.max_prompt_chars, model_version=body.model_version,
    )  # fmt: skip

    def answer(row: Generation) -> BaseModel:
        return respond(GenerationPublic.of(row), row.input)

    if not body.stream:
        return run.wait(answer, disconnected=ctx.disconnected)
    return event_stream(
        run.stream, lambda completion: run.record(completion, answer).model_dump(mode="json"),
        delta=lambda text: sse({"text": text}, "delta"),
        done=lambda _, answer: [sse(answer, "done")],
        error=lambda message: sse({"detail": message}, "error"),
    )  # fmt: skip


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**STREAM_DOC, **RATE_LIMITED},
    dependencies=[GenerationLimit],
)
def generate(body: GenerateRequest, ctx: GeneratingDep) -> Any:
    """Answer a prompt, and record the generation."""
    return _answer(
        Task.generate, body, ctx,
        lambda public, fields: GenerateResponse(**public.model_dump(), **fields),
    )  # fmt: skip


@router.post(
    "/translate",
    response_model=TranslateResponse,
    responses={**STREAM_DOC, **RATE_LIMITED},
    dependencies=[GenerationLimit],
)
def translate(body: TranslateRequest, ctx: GeneratingDep) -> Any:
    """Translate a text into `target_lang`, and record the generation."""
    return _answer(
        Task.translate, body, ctx,
        lambda public, fields: TranslateResponse(**public.model_dump(), **fields),
    )  # fmt: skip


@router.post(
    "/qa",
    response_model=QAResponse,
    responses={**STREAM_DOC, **RATE_LIMITED},
    dependencies=[GenerationLimit],
)
def qa(body: QARequest, ctx: GeneratingDep) -> Any:
    """Answer a question, from `context` when given, and record the generation."""
    return _answer(
        Task.qa, body, ctx,
        lambda public, fields: QAResponse(**public.model_dump(), **fields),
    )  # fmt: skip


@router.get("/generations", response_model=GenerationPage, responses=RATE_LIMITED)
def list_generations(
    key: CurrentKey,
    session: SessionDep,
    task: Task | None = None,
    model_version: str | None = None,
    rated: Annotated[
        bool | None, Query(description="Only rated (true) or unrated (false).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
) -> GenerationPage:
    """Recorded generations, newest first, one page at a time: a user key's own, or everyone's
    for rater and admin keys."""
    before_id = None
    if cursor is not None:
        if not cursor.isdigit() or not 1 <= int(cursor) <= MAX_ID:
            raise InvalidInput("cursor", "not a cursor this API returned", "query")
        before_id = int(cursor)
    rows, next_id = generations.list_generations(
        session, task=task, model_version=model_version, rated=rated, limit=limit,
        before_id=before_id, owner_id=visible_owner(key),
    )  # fmt: skip
    return GenerationPage(
        items=[GenerationPublic.of(row) for row in rows],
        next_cursor=None if next_id is None else str(next_id),
    )


@router.get("/generations/{generation_id}", response_model=GenerationPublic, responses=RATE_LIMITED)
def get_generation(
    generation_id: Annotated[int, Path(ge=1, le=MAX_ID)], key: CurrentKey, session: SessionDep
) -> GenerationPublic:
    """One recorded generation (a user key's own; rater and admin keys any)."""
    row = generations.get_generation(
        session, generation_id=generation_id, owner_id=visible_owner(key)
    )
    return GenerationPublic.of(row)
