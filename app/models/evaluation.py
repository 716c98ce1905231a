"""Automatic evaluations: a version's figures on the project's evaluation suite."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class Evaluation(Base):
    """One version scored on one revision of the evaluation suite (`digest`)."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("version_id", "digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    digest: Mapped[str] = mapped_column(String(64))
    """Short sha256 of the suite's files: figures compare only within one digest."""
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    """The round that evaluated it."""
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    examples: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    """A few open prompts with the version's answers."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
