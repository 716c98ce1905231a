"""Human ratings: feedback on one generation, and A/B comparisons of two."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import CheckConstraint, Enum, ForeignKey, Integer, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class Thumbs(enum.StrEnum):
    """A thumb up or down."""

    up = "up"
    down = "down"


class Winner(enum.StrEnum):
    """Which side of a comparison was preferred."""

    a = "a"
    b = "b"
    tie = "tie"


class Feedback(Base):
    """One rater's rating of one generation; a repeat by the same key updates it."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("generation_id", "api_key_id"),
        CheckConstraint("stars IS NULL OR (stars BETWEEN 1 AND 5)", name="stars_range"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    thumbs: Mapped[Thumbs | None] = mapped_column(Enum(Thumbs, native_enum=False, length=8))
    stars: Mapped[int | None] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    correction: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    used_in_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"), index=True)
    """The training round that trained on it; set only when that round ended."""
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """Rounds that failed (or lost their worker) while computing on a batch holding it."""
    set_aside_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When `failures` reached TRAINING_MAX_ROW_FAILURES: no round takes it any more, until an
    admin restores it (`POST .../restore`)."""
    set_aside_reason: Mapped[str | None] = mapped_column(Text)
    """Why: how many rounds failed with it, and the last one."""


class Comparison(Base):
    """One rater's choice between two answers to the same input; one per key and unordered pair."""

    __tablename__ = "comparisons"
    __table_args__ = (
        UniqueConstraint("api_key_id", "low_generation_id", "high_generation_id"),
        CheckConstraint("generation_a_id <> generation_b_id", name="distinct_sides"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_a_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    generation_b_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    # The pair in id order, so (a, b) and (b, a) are the same pair for the uniqueness rule.
    low_generation_id: Mapped[int] = mapped_column(Integer)
    high_generation_id: Mapped[int] = mapped_column(Integer)
    winner: Mapped[Winner] = mapped_column(Enum(Winner, native_enum=False, length=8))
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    used_in_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"), index=True)
    """The training round that trained on it; set only when that round ended."""
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """Rounds that failed (or lost their worker) while computing on a batch holding it."""
    set_aside_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When `failures` reached TRAINING_MAX_ROW_FAILURES: no round takes it any more, until an
    admin restores it (`POST .../restore`)."""
    set_aside_reason: Mapped[str | None] = mapped_column(Text)
    """Why: how many rounds failed with it, and the last one."""
