"""Training rounds: what each used, what it measured, what it made."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Enum, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, UTCDateTime, utcnow
from app.models.model_version import ModelVersion


class RunStatus(enum.StrEnum):
    """Where a round is: queued and running are live; the others are final."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    """A candidate was made and passed the gate; it is active unless the active version changed
    during the round (an admin's choice wins; `reason` says so and it stays a candidate)."""
    rejected = "rejected"
    """A candidate was made but failed the gate; `reason` says which check."""
    skipped = "skipped"
    """Too little new feedback; nothing was trained and nothing marked used."""
    failed = "failed"
    """An error or a lost worker; nothing was published and nothing marked used (the ratings of
    the batch it was computing on, if any, count a failure: `batch_ids`)."""


LIVE_STATUSES = (RunStatus.queued, RunStatus.running)


class TrainingRun(Base):
    """One round of preference optimisation."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[RunStatus] = mapped_column(
        Enum(RunStatus, native_enum=False, length=16), index=True
    )
    # True while queued or running, NULL after: the unique constraint allows one live round.
    live: Mapped[bool | None] = mapped_column(Boolean, unique=True)
    trigger: Mapped[str] = mapped_column(String(16))
    """`manual` (API or CLI) or `schedule` (beat)."""
    requested_by_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    """Training log per step (loss, KL, reward margins), for curves."""
    data_ids: Mapped[dict[str, list[int]] | None] = mapped_column(JSON)
    """Feedback and comparison ids the round took, train and held-out (`feedback`,
    `comparisons`)."""
    batch_ids: Mapped[dict[str, list[int]] | None] = mapped_column(JSON)
    """The same, of the batch of ratings it is computing on (in training or the gate), written
    before the batch and cleared after it: the only ratings charged a failure when the round
    fails or is declared lost. NULL between batches (a failure there is no rating's doing)."""
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    parent_version: Mapped[ModelVersion | None] = relationship(
        foreign_keys=[parent_version_id], lazy="joined"
    )
    version: Mapped[ModelVersion | None] = relationship(foreign_keys=[version_id], lazy="joined")
