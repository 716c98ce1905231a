"""Ratings and the export of training data."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from enum import StrEnum

from fastapi import APIRouter, Response, status
from sqlalchemy.orm import Session

from app.deps import RATE_LIMITED, CurrentKey, FeedbackLimit, SessionDep
from app.schemas.feedback import ComparisonCreate, ComparisonPublic, FeedbackCreate, FeedbackPublic
from app.services import datasets
from app.services.datasets import TrlRow
from app.services.feedback import Rating, compare, rate

router = APIRouter(prefix="/v1", tags=["feedback"])


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
    body: FeedbackCreate, key: CurrentKey, session: SessionDep, response: Response
) -> FeedbackPublic:
    """Rate a generation; rating it again updates your rating (200)."""
    rating = Rating(body.thumbs, body.stars, body.comment, body.correction)
    row, created = rate(session, key.id, body.generation_id, rating)
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
    """Choose between two answers to the same input; choosing again updates your choice (200)."""
    row, created = compare(session, key.id, body.generation_a, body.generation_b, body.winner)
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


_BUILDERS: dict[ExportFormat, Callable[[Session], Iterable[TrlRow]]] = {
    ExportFormat.kto: datasets.kto_rows,
    ExportFormat.dpo: datasets.pair_rows,
    ExportFormat.sft: datasets.sft_rows,
}


@router.get(
    "/export",
    response_class=Response,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "JSON Lines."}},
)
def export(format: ExportFormat, _: CurrentKey, session: SessionDep) -> Response:
    """The ratings as JSON Lines in TRL's formats: kto (prompt, completion, label), dpo (prompt,
    chosen, rejected) or sft (prompt, completion); the same rows training uses."""
    rows: Iterable[TrlRow] = _BUILDERS[format](session)
    lines = (json.dumps(row.trl(), ensure_ascii=False) + "\n" for row in rows)
    return Response(
        "".join(lines),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="feedback-{format.value}.jsonl"'},
    )
