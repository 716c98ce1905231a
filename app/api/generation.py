"""Generation endpoints and reading recorded generations."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status
from sqlalchemy.orm import Session

from app.config import Settings
from app.deps import CurrentKey, EngineDep, FollowerDep, SessionDep, SettingsDep
from app.ml.engine import Engine
from app.models import ApiKey, Role, Task
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
from app.services.serving import VersionFollower

router = APIRouter(prefix="/v1", tags=["generation"])
MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns; a larger one is a 422, not a database error


def _answer(
    task: Task,
    body: GenerateRequest | TranslateRequest | QARequest,
    key: ApiKey,
    session: Session,
    engine: Engine,
    settings: Settings,
    follower: VersionFollower,
) -> tuple[GenerationPublic, dict[str, Any]]:
    """Generate and record; the response fields and the task's input fields."""
    lease = None
    if body.model_version is not None:
        if key.role is not Role.admin:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "choosing model_version needs an admin key; leave it out to use the active version",
            )
        lease = follower.lease_by_name(session, body.model_version)
    row = generations.create_generation(
        session, engine, api_key_id=key.id, task=task, data=body.task_input(),
        params=body.sampling(), max_chars=settings.max_prompt_chars, version_lease=lease,
    )  # fmt: skip
    return GenerationPublic.of(row), row.input


@router.post("/generate", response_model=GenerateResponse)
def generate(
    body: GenerateRequest,
    key: CurrentKey,
    session: SessionDep,
    engine: EngineDep,
    settings: SettingsDep,
    follower: FollowerDep,
) -> GenerateResponse:
    """Answer a prompt, and record the generation."""
    public, fields = _answer(Task.generate, body, key, session, engine, settings, follower)
    return GenerateResponse(**public.model_dump(), **fields)


@router.post("/translate", response_model=TranslateResponse)
def translate(
    body: TranslateRequest,
    key: CurrentKey,
    session: SessionDep,
    engine: EngineDep,
    settings: SettingsDep,
    follower: FollowerDep,
) -> TranslateResponse:
    """Translate a text into `target_lang`, and record the generation."""
    public, fields = _answer(Task.translate, body, key, session, engine, settings, follower)
    return TranslateResponse(**public.model_dump(), **fields)


@router.post("/qa", response_model=QAResponse)
def qa(
    body: QARequest,
    key: CurrentKey,
    session: SessionDep,
    engine: EngineDep,
    settings: SettingsDep,
    follower: FollowerDep,
) -> QAResponse:
    """Answer a question, from `context` when given, and record the generation."""
    public, fields = _answer(Task.qa, body, key, session, engine, settings, follower)
    return QAResponse(**public.model_dump(), **fields)


@router.get("/generations", response_model=GenerationPage)
def list_generations(
    _: CurrentKey,
    session: SessionDep,
    task: Task | None = None,
    model_version: str | None = None,
    rated: Annotated[
        bool | None, Query(description="Only rated (true) or unrated (false).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
) -> GenerationPage:
    """Recorded generations, newest first, one page at a time."""
    before_id = None
    if cursor is not None:
        if not cursor.isdigit() or not 1 <= int(cursor) <= MAX_ID:
            raise InvalidInput("cursor", "not a cursor this API returned", "query")
        before_id = int(cursor)
    rows, next_id = generations.list_generations(
        session, task=task, model_version=model_version, rated=rated, limit=limit,
        before_id=before_id,
    )  # fmt: skip
    return GenerationPage(
        items=[GenerationPublic.of(row) for row in rows],
        next_cursor=None if next_id is None else str(next_id),
    )


@router.get("/generations/{generation_id}", response_model=GenerationPublic)
def get_generation(
    generation_id: Annotated[int, Path(ge=1, le=MAX_ID)], _: CurrentKey, session: SessionDep
) -> GenerationPublic:
    """One recorded generation."""
    return GenerationPublic.of(generations.get_generation(session, generation_id))
