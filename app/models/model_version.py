"""Model versions: the base model and every adapter trained from feedback."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Enum, ForeignKey, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class VersionKind(enum.StrEnum):
    """A plain base model, or a LoRA adapter on one."""

    base = "base"
    adapter = "adapter"


class VersionStatus(enum.StrEnum):
    """Lifecycle of a version; exactly one is `active` at a time."""

    candidate = "candidate"
    active = "active"
    retired = "retired"
    rejected = "rejected"
    refused = "refused"


class ModelVersion(Base):
    """One servable version of the model."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one active version, whoever writes: the database refuses a second.
        Index(
            "uq_model_versions_one_active",
            "status",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[VersionKind] = mapped_column(Enum(VersionKind, native_enum=False, length=16))
    base_model: Mapped[str] = mapped_column(String(500))
    """What the base weights are: `default` or the MODEL directory."""
    path: Mapped[str] = mapped_column(String(1000))
    """Directory holding the weights (base) or the adapter and its manifest."""
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    status: Mapped[VersionStatus] = mapped_column(
        Enum(VersionStatus, native_enum=False, length=16), index=True
    )
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
