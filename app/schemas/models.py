"""Model versions."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from app.models import VersionKind, VersionStatus


class ModelVersionPublic(BaseModel):
    """One model version."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    kind: VersionKind
    base_model: str
    status: VersionStatus
    status_reason: str | None
    serving: bool
    """Whether this process is serving it right now."""
    created_at: datetime
    activated_at: datetime | None


class ModelList(BaseModel):
    """Every version, the first base model first."""

    object: str = "list"
    data: list[ModelVersionPublic]
