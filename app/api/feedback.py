"""Ratings and the export of training data."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response, status
from fastapi.responses import StreamingResponse

from app.deps import (
    RATE_LIMITED,
    AdminKey,
    CurrentKey,
    FeedbackLimit,
    RegistryDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
)
from app.models import Comparison, Feedback
from app.schemas.feedback import (
    ComparisonCreate,
    ComparisonPublic,
    FeedbackCreate,
    FeedbackPublic,
    RatingStanding,
)
from app.services import datasets
from app.services.feedback import Rating, TokenCap, compare, rate, restore, set_aside
from app.services.keys import visible_owner
from app.training_config import TokenBudget

router = APIRouter(prefix="/v1", tags=["feedback"])

RatingId = Annotated[int, Path(ge=1, le=2**31 - 1)]
NOT_FOUND: dict[int | str, dict[str, str]] = {404: {"description": "No such rating."}}


def correction_cap(registry: RegistryDep, settings: SettingsDep) -> TokenCap:
    """The training budget's answer room, counted by the tokenizer of the version serving."""

    def count(text: str) -> int:
        return len(registry.active.tokenizer(text, add_special_tokens=False).input_ids)

    budget = TokenBudget.from_settings(settings)
    return TokenCap(count, budget.max_answer_tokens)


@router.post(
    "/feedback",
    status_code=status.HTTP_201_CREATED,
    response_model=FeedbackPublic,
    responses={
        200: {"model": FeedbackPublic, "description": "Your earlier rating, updated."},
        **RATE_LIMITED,
    },
    dependencies=[FeedbackLimit],
)
def create_feedback(
    body: FeedbackCreate,
    key: CurrentKey,
    session: SessionDep,
    response: Response,
    cap: Annotated[TokenCap, Depends(correction_cap)],
) -> FeedbackPublic:
    """Rate a generation; rating it again updates your rating (200). A user key rates its own
    generations (another's is a 404); rater and admin keys rate any."""
    rating = Rating(body.thumbs, body.stars, body.comment, body.correction)
    row, created = rate(
        session, api_key_id=key.id, generation_id=body.generation_id, rating=rating,
        owner_id=visible_owner(key), correction_cap=cap,
    )  # fmt: skip
    if not created:
        response.status_code = status.HTTP_200_OK
    return FeedbackPublic.model_validate(row)


@router.post(
    "/comparisons",
    status_code=status.HTTP_201_CREATED,
    response_model=ComparisonPublic,
    responses={
        200: {"model": ComparisonPublic, "description": "Your earlier choice, updated."},
        **RATE_LIMITED,
    },
    dependencies=[FeedbackLimit],
)
def create_comparison(
    body: ComparisonCreate, key: CurrentKey, session: SessionDep, response: Response
) -> ComparisonPublic:
    """Choose between two answers to the same input; choosing again updates your choice (200).
    A user key compares its own generations (another's is a 404); rater and admin keys any."""
    row, created = compare(
        session, api_key_id=key.id, generation_a=body.generation_a,
        generation_b=body.generation_b, winner=body.winner, owner_id=visible_owner(key),
    )  # fmt: skip
    if not created:
        response.status_code = status.HTTP_200_OK
    return ComparisonPublic(
        id=row.id,
        generation_a=row.generation_a_id,
        generation_b=row.generation_b_id,
        winner=row.winner,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class ExportFormat(StrEnum):
    """TRL dataset formats."""

    kto = "kto"
    dpo = "dpo"
    sft = "sft"


@router.get(
    "/export",
    response_class=Response,
    responses={
        200: {"content": {"application/x-ndjson": {}}, "description": "JSON Lines."},
        **RATE_LIMITED,
    },
)
def export(format: ExportFormat, key: CurrentKey, sessions: SessionsDep) -> StreamingResponse:
    """The ratings as JSON Lines in TRL's formats: kto (prompt, completion, label), dpo (prompt,
    chosen, rejected) or sft (prompt, completion); the same rows training uses. Streamed as it
    is read, in constant memory. A user key gets its own ratings of its own generations; rater
    and admin keys every rating."""
    owner_id = visible_owner(key)

    def lines() -> Iterator[str]:
        with sessions() as session:  # its own: the body is sent after the route returns
            yield from datasets.export_lines(session, kind=format.value, owner_id=owner_id)

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="feedback-{format.value}.jsonl"'},
    )


def _standing(row: Feedback | Comparison) -> RatingStanding:
    return RatingStanding(
        kind="feedback" if isinstance(row, Feedback) else "comparison",
        id=row.id,
        used_in_run_id=row.used_in_run_id,
        failures=row.failures,
        set_aside_at=row.set_aside_at,
        set_aside_reason=row.set_aside_reason,
    )


@router.get("/set-aside", response_model=list[RatingStanding], responses=RATE_LIMITED)
def list_set_aside(_: AdminKey, session: SessionDep) -> list[RatingStanding]:
    """The ratings set aside after TRAINING_MAX_ROW_FAILURES failed rounds were computing on a
    batch holding them, with the reason (admin): no round takes them until restored."""
    return [_standing(row) for row in set_aside(session)]


@router.post("/feedback/{feedback_id}/restore", response_model=RatingStanding, responses=NOT_FOUND)
def restore_feedback(feedback_id: RatingId, _: AdminKey, session: SessionDep) -> RatingStanding:
    """Give a rating back to the rounds (admin): no longer set aside, its failures back to 0."""
    return _standing(restore(session, model=Feedback, row_id=feedback_id))


@router.post(
    "/comparisons/{comparison_id}/restore", response_model=RatingStanding, responses=NOT_FOUND
)
def restore_comparison(comparison_id: RatingId, _: AdminKey, session: SessionDep) -> RatingStanding:
    """Give a comparison back to the rounds (admin): no longer set aside, its failures back
    to 0."""
    return _standing(restore(session, model=Comparison, row_id=comparison_id))
