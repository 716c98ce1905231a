"""Ratings turned into training rows, in TRL's formats; export and training share this code.

Rules: a thumb up, or 4-5 stars, marks an output desirable; a thumb down, or 1-2 stars,
undesirable; 3 stars says nothing. When both are given the thumb decides. A comparison's winner
is chosen over the loser (ties say nothing). A correction is chosen over the output it corrects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, aliased

from app.models import Comparison, Feedback, Generation, Thumbs, Winner

BATCH_ROWS = 100
"""Rows fetched from the database at a time (a server-side cursor on PostgreSQL): reading every
rating, for a round or an export, holds this many in memory, never the whole table."""


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


def _batched(query: Select[Feedback, Generation]) -> Select[Feedback, Generation]:
    return query.execution_options(yield_per=BATCH_ROWS)


def _own_ratings(
    query: Select[Feedback, Generation], owner_id: int | None
) -> Select[Feedback, Generation]:
    """Only the ratings `owner_id` gave to its own generations (None: every rating)."""
    if owner_id is None:
        return query
    return query.where(Feedback.api_key_id == owner_id, Generation.api_key_id == owner_id)


def kto_rows(
    session: Session, *, unused_only: bool = False, owner_id: int | None = None
) -> Iterator[KtoRow]:
    """One row per thumbs or stars rating that carries a signal, oldest first; with `owner_id`,
    only that key's ratings of its own generations."""
    query = (
        select(Feedback, Generation)
        .join(Generation, Feedback.generation_id == Generation.id)
        .where((Feedback.thumbs.is_not(None)) | (Feedback.stars.is_not(None)))
        .order_by(Feedback.id)
    )
    if unused_only:
        query = query.where(Feedback.used_in_run_id.is_(None), Feedback.set_aside_at.is_(None))
    for feedback, generation in session.execute(_batched(_own_ratings(query, owner_id))):
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


def pair_rows(
    session: Session, *, unused_only: bool = False, owner_id: int | None = None
) -> Iterator[PairRow]:
    """Pairs from comparisons with a winner, then from corrections, oldest first; with
    `owner_id`, only that key's choices and corrections on its own generations."""
    side_a, side_b = aliased(Generation), aliased(Generation)
    comparisons = (
        select(Comparison, side_a, side_b)
        .join(side_a, Comparison.generation_a_id == side_a.id)
        .join(side_b, Comparison.generation_b_id == side_b.id)
        .where(Comparison.winner != Winner.tie)
        .order_by(Comparison.id)
    )
    if unused_only:
        comparisons = comparisons.where(
            Comparison.used_in_run_id.is_(None), Comparison.set_aside_at.is_(None)
        )
    if owner_id is not None:
        comparisons = comparisons.where(
            Comparison.api_key_id == owner_id,
            side_a.api_key_id == owner_id,
            side_b.api_key_id == owner_id,
        )
    for comparison, a, b in session.execute(comparisons.execution_options(yield_per=BATCH_ROWS)):
        chosen, rejected = (a, b) if comparison.winner is Winner.a else (b, a)
        yield PairRow(
            a.prompt, chosen.output, rejected.output, "comparison", comparison.id,
            comparison.api_key_id, comparison.updated_at,
        )  # fmt: skip
    for feedback, generation in _corrections(session, unused_only=unused_only, owner_id=owner_id):
        assert feedback.correction is not None
        yield PairRow(
            generation.prompt, feedback.correction, generation.output, "correction", feedback.id,
            feedback.api_key_id, feedback.updated_at,
        )  # fmt: skip


def sft_rows(session: Session, *, owner_id: int | None = None) -> Iterator[SftRow]:
    """Corrections and outputs rated desirable, oldest first (`owner_id`: as for kto_rows)."""
    for row in kto_rows(session, owner_id=owner_id):
        if row.label:
            yield SftRow(row.prompt, row.completion)
    for feedback, generation in _corrections(session, owner_id=owner_id):
        assert feedback.correction is not None
        yield SftRow(generation.prompt, feedback.correction)


def _corrections(
    session: Session, *, unused_only: bool = False, owner_id: int | None = None
) -> Iterator[tuple[Feedback, Generation]]:
    query = (
        select(Feedback, Generation)
        .join(Generation, Feedback.generation_id == Generation.id)
        .where(Feedback.correction.is_not(None))
        .order_by(Feedback.id)
    )
    if unused_only:
        query = query.where(Feedback.used_in_run_id.is_(None), Feedback.set_aside_at.is_(None))
    yield from session.execute(_batched(_own_ratings(query, owner_id))).tuples()


EXPORTS: dict[str, Callable[..., Iterator[TrlRow]]] = {
    "kto": kto_rows,
    "dpo": pair_rows,
    "sft": sft_rows,
}
"""The export formats and the rows each is made of."""

CHUNK_BYTES = 64 * 1024
"""About how much JSON Lines text an export hands on at a time."""


def export_lines(session: Session, *, kind: str, owner_id: int | None = None) -> Iterator[str]:
    """The rows of `kind` (kto, dpo or sft) as JSON Lines, in chunks of about CHUNK_BYTES, read
    in batches (constant memory whatever the number of ratings); with `owner_id`, only that
    key's ratings of its own generations."""
    chunk: list[str] = []
    size = 0
    for row in EXPORTS[kind](session, owner_id=owner_id):
        line = json.dumps(row.trl(), ensure_ascii=False) + "\n"
        chunk.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield "".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "".join(chunk)
