"""Statistics for the operator dashboard: per-version figures, the leaderboard, daily activity."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.models import VersionKind

Probability = Annotated[float, Field(ge=0, le=1)]


class _FromService(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class VersionStats(_FromService):
    """Traffic and rating figures of one model version."""

    name: str
    kind: VersionKind
    status: str
    created_at: datetime
    activated_at: datetime | None
    generations: int = Field(description="Generations this version produced.")
    rated_generations: int = Field(description="Of those, how many have at least one rating.")
    ratings: int = Field(description="Feedback rows on its generations.")
    approvals: int = Field(description="Ratings marking the output desirable (as training does).")
    disapprovals: int = Field(description="Ratings marking the output undesirable.")
    approval_rate: Probability | None = Field(description="approvals / (approvals+disapprovals).")
    approval_ci: tuple[Probability, Probability] | None = Field(
        description="Wilson score 95% interval of the approval rate."
    )
    stars_count: int
    mean_stars: float | None
    comparisons: int = Field(
        description="Comparisons of one of its generations with another version's."
    )
    wins: int
    losses: int
    ties: int
    win_rate: Probability | None = Field(description="(wins + ties/2) / comparisons.")


class VersionStatsList(BaseModel):
    """Every model version, oldest first."""

    data: list[VersionStats]


class LeaderboardRow(_FromService):
    """One version's Bradley-Terry score and record against other versions."""

    rank: int = Field(description="1 is the best.")
    name: str
    score: float = Field(description="400*log10(strength); the listed versions average 1000.")
    ci_low: float | None = Field(description="2.5th bootstrap percentile; null when samples=0.")
    ci_high: float | None = Field(description="97.5th bootstrap percentile; null when samples=0.")
    battles: int
    wins: int
    losses: int
    ties: int


class LeaderboardResponse(BaseModel):
    """Versions with at least one cross-version comparison, best first."""

    data: list[LeaderboardRow]
    comparisons: int = Field(description="Comparisons between different versions that were used.")
    method: str


class DayCounts(_FromService):
    """Ratings and comparisons created on one UTC day."""

    date: date
    ratings: int
    comparisons: int


class DayApproval(_FromService):
    """Approvals and disapprovals given on one UTC day to one version's generations."""

    date: date
    version: str
    approvals: int
    disapprovals: int
    approval_rate: Probability | None


class DailyResponse(BaseModel):
    """Every day of the window, oldest first; approval per day and version where any was given."""

    days: list[DayCounts]
    approval: list[DayApproval]
