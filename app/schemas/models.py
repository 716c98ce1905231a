"""Model versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.models import VersionKind, VersionStatus


class ModelVersionPublic(BaseModel):
    """One model version."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    kind: VersionKind
    base_model: str
    parent: str | None
    """The version it was trained from (adapters)."""
    status: VersionStatus
    status_reason: str | None
    serving: bool
    """Whether this process is serving it right now."""
    metrics: dict[str, Any]
    """Training and gate measurements (adapters)."""
    created_at: datetime
    activated_at: datetime | None


class ModelList(BaseModel):
    """Every version, the first base model first."""

    object: str = "list"
    data: list[ModelVersionPublic]
