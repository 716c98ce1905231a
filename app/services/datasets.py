"""Ratings turned into training rows, in TRL's formats; export and training share this code.

Rules: a thumb up, or 4-5 stars, marks an output desirable; a thumb down, or 1-2 stars,
undesirable; 3 stars says nothing. When both are given the thumb decides. A comparison's winner
is chosen over the loser (ties say nothing). A correction is chosen over the output it corrects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from app.models import Comparison, Feedback, Generation, Thumbs, Winner


class TrlRow(Protocol):
    """A training row that can be written in TRL's dataset format."""

    def trl(self) -> dict[str, object]:
        """The row as TRL expects it."""
        ...


@dataclass(frozen=True)
class KtoRow:
    """An unpaired example: a completion labelled desirable (True) or undesirable (False)."""

    prompt: str
    completion: str
    label: bool
    feedback_id: int
    generation_id: int
    rater_id: int
    created_at: datetime

    def trl(self) -> dict[str, object]:
        """The row in TRL's KTO format."""
        return {"prompt": self.prompt, "completion": self.completion, "label": self.label}


@dataclass(frozen=True)
class PairRow:
    """A preference pair: `chosen` was preferred over `rejected` for the same prompt."""

    prompt: str
    chosen: str
    rejected: str
    source: str
    """`comparison` or `correction`."""
    source_id: int
    rater_id: int
    created_at: datetime

    def trl(self) -> dict[str, object]:
        """The row in TRL's DPO format."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass(frozen=True)
class SftRow:
    """A completion worth imitating: an approved output or a correction."""

    prompt: str
    completion: str

    def trl(self) -> dict[str, object]:
        """The row in TRL's prompt-completion format."""
        return {"prompt": self.prompt, "completion": self.completion}


def desirability(thumbs: Thumbs | None, stars: int | None) -> bool | None:
    """True (desirable), False (undesirable) or None (no signal) for one rating."""
    if thumbs is not None:
        return thumbs is Thumbs.up
    if stars is None or stars == 3:
        return None
    return stars >= 4


def kto_rows(session: Session, unused_only: bool = False) -> Iterator[KtoRow]:
    """One row per thumbs or stars rating that carries a signal, oldest first."""
    query = (
        select(Feedback, Generation)
        .join(Generation, Feedback.generation_id == Generation.id)
        .where((Feedback.thumbs.is_not(None)) | (Feedback.stars.is_not(None)))
        .order_by(Feedback.id)
    )
    if unused_only:
        query = query.where(Feedback.used_in_run_id.is_(None))
    for feedback, generation in session.execute(query):
        label = desirability(feedback.thumbs, feedback.stars)
        if label is not None:
            yield KtoRow(
                generation.prompt,
                generation.output,
                label,
                feedback.id,
                generation.id,
                feedback.api_key_id,
                feedback.updated_at,
            )


def pair_rows(session: Session, unused_only: bool = False) -> Iterator[PairRow]:
    """Pairs from comparisons with a winner, then from corrections, oldest first."""
    side_a, side_b = aliased(Generation), aliased(Generation)
    comparisons = (
        select(Comparison, side_a, side_b)
        .join(side_a, Comparison.generation_a_id == side_a.id)
        .join(side_b, Comparison.generation_b_id == side_b.id)
        .where(Comparison.winner != Winner.tie)
        .order_by(Comparison.id)
    )
    if unused_only:
        comparisons = comparisons.where(Comparison.used_in_run_id.is_(None))
    for comparison, a, b in session.execute(comparisons):
        chosen, rejected = (a, b) if comparison.winner is Winner.a else (b, a)
        yield PairRow(
            a.prompt, chosen.output, rejected.output, "comparison", comparison.id,
            comparison.api_key_id, comparison.updated_at,
        )  # fmt: skip
    for feedback, generation in _corrections(session, unused_only):
        assert feedback.correction is not None
        yield PairRow(
            generation.prompt, feedback.correction, generation.output, "correction", feedback.id,
            feedback.api_key_id, feedback.updated_at,
        )  # fmt: skip


def sft_rows(session: Session) -> Iterator[SftRow]:
    """Corrections and outputs rated desirable, oldest first."""
    for row in kto_rows(session):
        if row.label:
            yield SftRow(row.prompt, row.completion)
    for feedback, generation in _corrections(session):
        assert feedback.correction is not None
        yield SftRow(generation.prompt, feedback.correction)


def _corrections(
    session: Session, unused_only: bool = False
) -> Iterator[tuple[Feedback, Generation]]:
    query = (
        select(Feedback, Generation)
        .join(Generation, Feedback.generation_id == Generation.id)
        .where(Feedback.correction.is_not(None))
        .order_by(Feedback.id)
    )
    if unused_only:
        query = query.where(Feedback.used_in_run_id.is_(None))
    yield from session.execute(query).tuples()
