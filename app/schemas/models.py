"""Model versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.models import VersionKind, VersionStatus


class ModelVersionPublic(BaseModel):
    """One model version."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="The version's name, as OpenAI clients expect it.")
    object: str = "model"
    created: int = Field(description="Unix time the version was made.")
    owned_by: str = "feedback-lm"
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
