"""Recording ratings: feedback on one generation and comparisons of two; and the ratings that
failed rounds set aside, which an admin may restore."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import Comparison, Feedback, Thumbs, Winner
from app.services.errors import InvalidInput, NotFound
from app.services.generations import get_generation

Row = TypeVar("Row", Feedback, Comparison)


@dataclass(frozen=True)
class TokenCap:
    """The most tokens a correction may have, and how to count them (the serving tokenizer)."""

    count: Callable[[str], int]
    limit: int


@dataclass(frozen=True)
class Rating:
    """The fields a rater set; None leaves a stored value as it is."""

    thumbs: Thumbs | None = None
    stars: int | None = None
    comment: str | None = None
    correction: str | None = None


def rate(
    session: Session,
    *,
    api_key_id: int,
    generation_id: int,
    rating: Rating,
    owner_id: int | None = None,
    correction_cap: TokenCap | None = None,
) -> tuple[Feedback, bool]:
    """Store a key's rating of a generation; a repeat updates it. Returns (row, created).

    With `owner_id` (a user key), only that key's own generations can be rated; another's is
    missing (404)."""
    generation = get_generation(session, generation_id=generation_id, owner_id=owner_id)
    if rating.correction is not None and rating.correction.strip() == generation.output.strip():
        raise InvalidInput("correction", "the correction is the same as the model's output")
    if rating.correction is not None and correction_cap is not None:
        # Training keeps a prompt's last TRAINING_MAX_PROMPT_TOKENS, so a correction within the
        # cap fits after any prompt with its EOS and is never cut.
        tokens = correction_cap.count(rating.correction)
        if tokens > correction_cap.limit:
            raise InvalidInput(
                "correction",
                f"the correction is {tokens} tokens long; at most {correction_cap.limit} tokens "
                "fit in training (TRAINING_MAX_LENGTH - TRAINING_MAX_PROMPT_TOKENS - 1)",
            )

    def apply(feedback: Feedback) -> None:
        for field in ("thumbs", "stars", "comment", "correction"):
            value = getattr(rating, field)
            if value is not None:
                setattr(feedback, field, value)

    return _upsert(
        session,
        lambda: session.scalar(
            select(Feedback).where(
                Feedback.generation_id == generation_id, Feedback.api_key_id == api_key_id
            )
        ),
        lambda: Feedback(generation_id=generation_id, api_key_id=api_key_id),
        apply,
    )


def compare(
    session: Session,
    *,
    api_key_id: int,
    generation_a: int,
    generation_b: int,
    winner: Winner,
    owner_id: int | None = None,
) -> tuple[Comparison, bool]:
    """Store a key's choice between two answers to the same input. Returns (row, created).

    With `owner_id` (a user key), both answers must be that key's own."""
    if generation_a == generation_b:
        raise InvalidInput("generation_b", "generation_b must differ from generation_a")
    first = get_generation(session, generation_id=generation_a, owner_id=owner_id)
    second = get_generation(session, generation_id=generation_b, owner_id=owner_id)
    if (first.task, first.input_hash) != (second.task, second.input_hash):
        raise InvalidInput(
            "generation_b", "both generations must answer the same task and input to be compared"
        )
    low, high = sorted((generation_a, generation_b))

    def apply(comparison: Comparison) -> None:
        comparison.generation_a_id = generation_a
        comparison.generation_b_id = generation_b
        comparison.winner = winner

    return _upsert(
        session,
        lambda: session.scalar(
            select(Comparison).where(
                Comparison.api_key_id == api_key_id,
                Comparison.low_generation_id == low,
                Comparison.high_generation_id == high,
            )
        ),
        lambda: Comparison(api_key_id=api_key_id, low_generation_id=low, high_generation_id=high),
        apply,
    )


def _upsert(
    session: Session,
    find: Callable[[], Row | None],
    create: Callable[[], Row],
    apply: Callable[[Row], None],
) -> tuple[Row, bool]:
    """Update the row `find` returns, or add the one `create` makes; returns (row, created).

    When the same key writes the same row concurrently, the unique constraint stops the second
    insert; that writer retries once and updates the row that won.
    """
    for attempt in range(2):
        row = find()
        created = row is None
        if row is None:
            row = create()
            session.add(row)
        apply(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            if attempt:
                raise
            continue
        return row, created
    raise AssertionError("unreachable")


_KINDS: dict[type[Feedback | Comparison], str] = {Feedback: "feedback", Comparison: "comparison"}


def set_aside(session: Session) -> list[Feedback | Comparison]:
    """Every rating set aside after failed rounds (no round takes it), feedback then
    comparisons, each in the order it was set aside."""
    rows: list[Feedback | Comparison] = []
    for model in (Feedback, Comparison):
        query = select(model).where(model.set_aside_at.is_not(None))
        rows += session.scalars(query.order_by(model.set_aside_at, model.id))
    return rows


def restore(session: Session, *, model: type[Row], row_id: int) -> Row:
    """Give a rating back to the rounds (commits): it is no longer set aside and its failures
    count from zero again, so that a later round takes it if no round used it yet."""
    row = session.get(model, row_id)
    if row is None:
        raise NotFound(f"{_KINDS[model]} {row_id} does not exist")
    row.failures, row.set_aside_at, row.set_aside_reason = 0, None, None
    session.commit()
    return row
