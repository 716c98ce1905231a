"""Quality figures per model version, for the dashboard: read-only, any valid key; kept until
the data changes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import RATE_LIMITED, CurrentKey, SessionDep, StatsCacheDep
from app.schemas.stats import (
    DailyResponse,
    DayApproval,
    DayCounts,
    LeaderboardResponse,
    LeaderboardRow,
    VersionStats,
    VersionStatsList,
)
from app.services import stats

router = APIRouter(prefix="/v1/stats", tags=["stats"], responses=RATE_LIMITED)


@router.get("/versions", response_model=VersionStatsList)
def versions(_: CurrentKey, session: SessionDep, cache: StatsCacheDep) -> VersionStatsList:
    """Traffic, approval, stars and head-to-head record of every version, oldest first."""
    rows = stats.cached_version_stats(session, cache=cache)
    return VersionStatsList(data=[VersionStats.model_validate(row) for row in rows])


@router.get("/leaderboard", response_model=LeaderboardResponse)
def leaderboard(
    _: CurrentKey,
    session: SessionDep,
    cache: StatsCacheDep,
    samples: Annotated[
        int, Query(ge=0, le=2000, description="Bootstrap resamples for the intervals; 0: none.")
    ] = 200,
) -> LeaderboardResponse:
    """Versions ranked by a Bradley-Terry fit of comparisons between different versions."""
    board = stats.cached_leaderboard(session, cache=cache, samples=samples)
    return LeaderboardResponse(
        data=[LeaderboardRow.model_validate(row) for row in board.rows],
        comparisons=board.comparisons,
        method=board.method,
    )


@router.get("/daily", response_model=DailyResponse)
def daily(
    _: CurrentKey,
    session: SessionDep,
    cache: StatsCacheDep,
    days: Annotated[
        int, Query(ge=1, le=366, description="Days in the window, ending today UTC.")
    ] = 30,
) -> DailyResponse:
    """Ratings and comparisons per UTC day, and approval per day and version."""
    result = stats.cached_daily(session, cache=cache, days=days)
    return DailyResponse(
        days=[DayCounts.model_validate(day) for day in result.days],
        approval=[DayApproval.model_validate(row) for row in result.approval],
    )
