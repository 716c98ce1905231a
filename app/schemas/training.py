"""Training rounds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.models import RunStatus, TrainingRun
from app.schemas.common import StrictModel
from app.training_config import GateConfig, RewardModelConfig, TrainConfig


class TrainingRunCreate(StrictModel):
    """Start a round now; optionally override hyper-parameters or gate thresholds for it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{}, {"train": {"learning_rate": 1e-4, "epochs": 3}}]},
    )

    train: TrainConfig | None = None
    gate: GateConfig | None = None
    reward_model: RewardModelConfig | None = None


PER_RATER_COUNTS = ("excluded_raters", "consensus")
"""The keys of a run's counts that name raters (the consensus and revocation figures): shown to
admin keys only."""


class TrainingRunPublic(BaseModel):
    """A round: status, timing, data counts, metrics and what it made."""

    id: int
    status: RunStatus
    trigger: str
    parent_version: str | None = Field(description="The version it trained from.")
    version: str | None = Field(description="The version it made (active or rejected).")
    reason: str | None = Field(description="Why it was skipped, rejected or failed.")
    counts: dict[str, Any] = Field(
        description="Rows trained on, held out and left out; admin keys also see which raters "
        "were left out and why (`excluded_raters`, `consensus`)."
    )
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = Field(description="Per-step loss, KL and reward margins.")
    config: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @classmethod
    def of(cls, run: TrainingRun, *, per_rater: bool = True) -> TrainingRunPublic:
        """Build from the ORM row; without `per_rater`, the counts that name raters are left
        out."""
        counts = run.counts
        if not per_rater:
            counts = {name: value for name, value in counts.items() if name not in PER_RATER_COUNTS}
        return cls(
            id=run.id,
            status=run.status,
            trigger=run.trigger,
            parent_version=run.parent_version.name if run.parent_version else None,
            version=run.version.name if run.version else None,
            reason=run.reason,
            counts=counts,
            metrics=run.metrics,
            history=run.history,
            config=run.config,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            heartbeat_at=run.heartbeat_at,
        )
