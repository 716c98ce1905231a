"""Ratings: feedback on one generation and comparisons of two."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.models import Thumbs, Winner
from app.schemas.common import NonBlank, StrictModel

# Ids are JSON integers (strict: `true` or "7" is no id) within the database's 32-bit INTEGER,
# so an out-of-range id is a 422 rather than a database error.
GenerationId = Annotated[int, Field(strict=True, ge=1, le=2**31 - 1)]
Stars = Annotated[int, Field(strict=True, ge=1, le=5)]
"""1 to 5 as a JSON integer: `true` must not be stored as 1 star."""


class FeedbackCreate(StrictModel):
    """A rating of one generation: at least one of thumbs, stars, correction."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"generation_id": 1, "thumbs": "up", "stars": 5}]},
    )

    generation_id: GenerationId
    thumbs: Thumbs | None = None
    stars: Stars | None = None
    comment: Annotated[str | None, Field(max_length=4000)] = None
    correction: Annotated[
        NonBlank | None,
        Field(
            max_length=16000,
            description="A better answer, written by the rater: at most "
            "TRAINING_MAX_LENGTH - TRAINING_MAX_PROMPT_TOKENS - 1 tokens (255 by default), so "
            "that training never cuts it; a longer one is a 422 that says the limit.",
        ),
    ] = None

    @model_validator(mode="after")
    def _has_a_signal(self) -> FeedbackCreate:
        if self.thumbs is None and self.stars is None and self.correction is None:
            raise ValueError("give at least one of thumbs, stars or correction")
        return self


class FeedbackPublic(BaseModel):
    """A stored rating."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    generation_id: int
    thumbs: Thumbs | None
    stars: int | None
    comment: str | None
    correction: str | None
    created_at: datetime
    updated_at: datetime


class ComparisonCreate(StrictModel):
    """A choice between two answers to the same task and input."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"generation_a": 1, "generation_b": 2, "winner": "a"}]},
    )

    generation_a: GenerationId
    generation_b: GenerationId
    winner: Winner


class ComparisonPublic(BaseModel):
    """A stored comparison."""

    id: int
    generation_a: int
    generation_b: int
    winner: Winner
    created_at: datetime
    updated_at: datetime


class RatingStanding(BaseModel):
    """Where a rating stands with the training rounds: used, charged failures, set aside."""

    kind: Literal["feedback", "comparison"]
    id: int
    used_in_run_id: int | None = Field(description="The round that trained on it, if any.")
    failures: int = Field(
        description="Failed rounds (or rounds whose worker was lost) that were computing on a "
        "batch holding it; at TRAINING_MAX_ROW_FAILURES it is set aside."
    )
    set_aside_at: datetime | None = Field(
        description="When it was set aside: no round takes it until an admin restores it."
    )
    set_aside_reason: str | None
