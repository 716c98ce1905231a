"""Generation endpoints and reading recorded generations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status
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
from app.models import Role, Task
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
    lease = None
    if body.model_version is not None:
        if ctx.key.role is not Role.admin:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "choosing model_version needs an admin key; leave it out to use the active version",
            )
        lease = ctx.follower.lease_by_name(ctx.session, body.model_version)
    data, params, key_id = body.task_input(), body.sampling(), ctx.key.id
    max_chars = ctx.settings.max_prompt_chars
    if not body.stream:
        row = generations.create_generation(
            ctx.session, ctx.engine, api_key_id=key_id, task=task, data=data, params=params,
            max_chars=max_chars, version_lease=lease, disconnected=ctx.disconnected,
        )  # fmt: skip
        return respond(GenerationPublic.of(row), row.input)
    stream, prompt = generations.start_generation(
        ctx.engine, task=task, data=data, params=params, max_chars=max_chars, version_lease=lease,
        owner=key_id,
    )  # fmt: skip
    generations.release_connection(ctx.session)  # a stream can outlive the pool's patience
    record = generations.recorder(
        ctx.sessions,
        lambda row: respond(GenerationPublic.of(row), row.input).model_dump(mode="json"),
        api_key_id=key_id, task=task, data=data, prompt=prompt, params=params,
    )  # fmt: skip
    return event_stream(
        stream, record,
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
    row = generations.get_generation(session, generation_id, owner_id=visible_owner(key))
    return GenerationPublic.of(row)
