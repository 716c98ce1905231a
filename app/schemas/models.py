"""Model versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.models import VersionKind, VersionStatus


class EvaluationPublic(BaseModel):
    """A version's automatic evaluation on the project's suite (references and open prompts)."""

    model_config = ConfigDict(from_attributes=True)

    digest: str = Field(description="Revision of the suite: figures compare only within one.")
    metrics: dict[str, float] = Field(
        description="chrf and rouge_l (against references, 0-1), reference_score, repetition "
        "(repeated word trigrams), distinct_2, mean_words, empty_fraction, opening_diversity, "
        "base_perplexity (the base model's, of the answers)."
    )
    examples: list[dict[str, str]] = Field(description="A few open prompts and their answers.")
    created_at: datetime


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
    evaluation: EvaluationPublic | None = None
    """Its newest automatic evaluation (a version is evaluated by the round that trains it, or
    as the parent of the next round)."""


class ModelList(BaseModel):
    """Every version, the first base model first."""

    object: str = "list"
    data: list[ModelVersionPublic]
