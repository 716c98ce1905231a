"""Read-only quality figures per model version, for the operator dashboard.

Approvals and disapprovals use `desirability`, the rule training uses, so the dashboard and the
training data always agree on what a rating means.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, TypeVar, cast

import numpy as np
from sqlalchemy import Select, distinct, func, select
from sqlalchemy.orm import Session, aliased

from app.db import utcnow
from app.models import Comparison, Feedback, Generation, ModelVersion, Winner
from app.services import leaderboard
from app.services.datasets import desirability

Z_95 = 1.959963984540054
"""The standard normal quantile for a two-sided 95% interval."""
T = TypeVar("T")


@dataclass(frozen=True)
class VersionStats:
    """Traffic and rating figures of one model version."""

    name: str
    kind: str
    status: str
    created_at: datetime
    activated_at: datetime | None
    generations: int
    rated_generations: int
    ratings: int
    approvals: int
    disapprovals: int
    approval_rate: float | None
    approval_ci: tuple[float, float] | None
    stars_count: int
    mean_stars: float | None
    comparisons: int
    wins: int
    losses: int
    ties: int
    win_rate: float | None


@dataclass(frozen=True)
class LeaderboardRow:
    """One version's Bradley-Terry score and record against other versions."""

    rank: int
    name: str
    score: float
    ci_low: float | None
    ci_high: float | None
    battles: int
    wins: int
    losses: int
    ties: int


@dataclass(frozen=True)
class Leaderboard:
    """Versions ranked best first, and how many comparisons the fit used."""

    rows: list[LeaderboardRow]
    comparisons: int
    method: str


@dataclass(frozen=True)
class DayCounts:
    """Ratings and comparisons created on one UTC day."""

    date: date
    ratings: int
    comparisons: int


@dataclass(frozen=True)
class DayApproval:
    """Approvals and disapprovals given on one UTC day to one version's generations."""

    date: date
    version: str
    approvals: int
    disapprovals: int
    approval_rate: float | None


@dataclass(frozen=True)
class Daily:
    """Every day of a window with its counts, and approval per day and version."""

    days: list[DayCounts]
    approval: list[DayApproval]


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion; None with no trials."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # Clamp rounding noise: the interval always lies within [0, 1].
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _cross_version_comparisons() -> Select[int, int, Winner, int]:
    """(version of a, version of b, winner, count) over comparisons of two different versions."""
    side_a, side_b = aliased(Generation), aliased(Generation)
    return (
        select(side_a.model_version_id, side_b.model_version_id, Comparison.winner, func.count())
        .join(side_a, Comparison.generation_a_id == side_a.id)
        .join(side_b, Comparison.generation_b_id == side_b.id)
        .where(side_a.model_version_id != side_b.model_version_id)
        .group_by(side_a.model_version_id, side_b.model_version_id, Comparison.winner)
    )


@dataclass
class _Record:
    wins: int = 0
    losses: int = 0
    ties: int = 0

    @property
    def total(self) -> int:
        return self.wins + self.losses + self.ties


def _records(grouped: Iterable[tuple[int, int, Winner, int]]) -> dict[int, _Record]:
    """Each version's wins, losses and ties from grouped cross-version comparisons."""
    records: dict[int, _Record] = defaultdict(_Record)
    for version_a, version_b, winner, n in grouped:
        a, b = records[version_a], records[version_b]
        if winner is Winner.tie:
            a.ties += n
            b.ties += n
        elif winner is Winner.a:
            a.wins += n
            b.losses += n
        else:
            b.wins += n
            a.losses += n
    return dict(records)


def _per_version(session: Session, query: Select[int, int]) -> dict[int, int]:
    """A (version id, count) query as a dict."""
    return {vid: n for vid, n in session.execute(query).tuples()}


def version_stats(session: Session) -> list[VersionStats]:
    """Figures for every model version, oldest first, including versions with no traffic."""
    versions = list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))
    generations = _per_version(
        session,
        select(Generation.model_version_id, func.count()).group_by(Generation.model_version_id),
    )
    rated = _per_version(
        session,
        select(Generation.model_version_id, func.count(distinct(Feedback.generation_id)))
        .join(Generation, Feedback.generation_id == Generation.id)
        .group_by(Generation.model_version_id),
    )
    ratings: dict[int, int] = defaultdict(int)
    approvals: dict[int, int] = defaultdict(int)
    disapprovals: dict[int, int] = defaultdict(int)
    stars_count: dict[int, int] = defaultdict(int)
    stars_sum: dict[int, int] = defaultdict(int)
    # Grouping by the rating's values keeps the rows few whatever the volume of feedback.
    by_rating = (
        select(Generation.model_version_id, Feedback.thumbs, Feedback.stars, func.count())
        .join(Generation, Feedback.generation_id == Generation.id)
        .group_by(Generation.model_version_id, Feedback.thumbs, Feedback.stars)
    )
    for version_id, thumbs, stars, n in session.execute(by_rating).tuples():
        ratings[version_id] += n
        label = desirability(thumbs, stars)
        if label is True:
            approvals[version_id] += n
        elif label is False:
            disapprovals[version_id] += n
        if stars is not None:
            stars_count[version_id] += n
            stars_sum[version_id] += stars * n
    records = _records(session.execute(_cross_version_comparisons()).tuples())
    result = []
    for version in versions:
        vid = version.id
        judged = approvals[vid] + disapprovals[vid]
        record = records.get(vid, _Record())
        result.append(
            VersionStats(
                name=version.name,
                kind=version.kind.value,
                status=version.status.value,
                created_at=version.created_at,
                activated_at=version.activated_at,
                generations=generations.get(vid, 0),
                rated_generations=rated.get(vid, 0),
                ratings=ratings[vid],
                approvals=approvals[vid],
                disapprovals=disapprovals[vid],
                approval_rate=_rate(approvals[vid], judged),
                approval_ci=wilson_interval(approvals[vid], judged),
                stars_count=stars_count[vid],
                mean_stars=_rate(stars_sum[vid], stars_count[vid]),
                comparisons=record.total,
                wins=record.wins,
                losses=record.losses,
                ties=record.ties,
                win_rate=_rate(record.wins + record.ties / 2, record.total),
            )
        )
    return result


def _method(samples: int) -> str:
    interval = (
        f"95% interval from the 2.5-97.5 percentiles of {samples} bootstrap resamples of the "
        f"comparisons (seed {leaderboard.SEED})"
        if samples
        else "no interval (samples=0)"
    )
    return (
        f"Bradley-Terry fitted by Newton's method with an L2 prior ({leaderboard.PRIOR}) on "
        "comparisons between different versions, a tie half a win for each; "
        f"score = 400*log10(strength), mean 1000; {interval}"
    )


def version_leaderboard(session: Session, samples: int) -> Leaderboard:
    """Versions ranked by Bradley-Terry score from cross-version comparisons, best first."""
    grouped = list(session.execute(_cross_version_comparisons()).tuples())
    if not grouped:
        return Leaderboard([], 0, _method(samples))
    ids = sorted({vid for row in grouped for vid in row[:2]})
    index = {vid: i for i, vid in enumerate(ids)}
    query = select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(ids))
    names = {vid: name for vid, name in session.execute(query).tuples()}
    result_of = {Winner.a: 1.0, Winner.b: 0.0, Winner.tie: 0.5}
    outcomes = leaderboard.Outcomes(
        first=np.array([index[a] for a, _, _, _ in grouped], dtype=np.int64),
        second=np.array([index[b] for _, b, _, _ in grouped], dtype=np.int64),
        result=np.array([result_of[w] for _, _, w, _ in grouped], dtype=np.float64),
        count=np.array([n for *_, n in grouped], dtype=np.float64),
        players=len(ids),
    )
    point = leaderboard.scores(leaderboard.fit(outcomes.wins()))
    low: list[float | None] = [None] * len(ids)
    high: list[float | None] = [None] * len(ids)
    if samples > 0:
        resampled = leaderboard.bootstrap_scores(outcomes, samples)
        low = [float(x) for x in np.percentile(resampled, 2.5, axis=0)]
        high = [float(x) for x in np.percentile(resampled, 97.5, axis=0)]
    records = _records(grouped)
    order = sorted(range(len(ids)), key=lambda i: (-point[i], names[ids[i]]))
    rows = [
        LeaderboardRow(
            rank=rank,
            name=names[ids[i]],
            score=float(point[i]),
            ci_low=low[i],
            ci_high=high[i],
            battles=records[ids[i]].total,
            wins=records[ids[i]].wins,
            losses=records[ids[i]].losses,
            ties=records[ids[i]].ties,
        )
        for rank, i in enumerate(order, start=1)
    ]
    return Leaderboard(rows, int(outcomes.count.sum()), _method(samples))


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def daily(session: Session, *, days: int, today: date | None = None) -> Daily:
    """Ratings and comparisons per UTC day over the last `days` days ending today, and approval
    per day and version on days that had any."""
    last = today or utcnow().date()
    first = last - timedelta(days=days - 1)
    start, end = _day_start(first), _day_start(last + timedelta(days=1))
    ratings: dict[date, int] = defaultdict(int)
    comparisons: dict[date, int] = defaultdict(int)
    approvals: dict[tuple[date, int], int] = defaultdict(int)
    disapprovals: dict[tuple[date, int], int] = defaultdict(int)
    names: dict[int, str] = {}
    # Day buckets are made here, not in SQL: date functions differ between SQLite and PostgreSQL.
    feedback = (
        select(
            Feedback.created_at, Feedback.thumbs, Feedback.stars, ModelVersion.id, ModelVersion.name
        )
        .join(Generation, Feedback.generation_id == Generation.id)
        .join(ModelVersion, Generation.model_version_id == ModelVersion.id)
        .where(Feedback.created_at >= start, Feedback.created_at < end)
    )
    for created_at, thumbs, stars, version_id, name in session.execute(feedback).tuples():
        day = created_at.astimezone(UTC).date()
        ratings[day] += 1
        names[version_id] = name
        label = desirability(thumbs, stars)
        if label is True:
            approvals[day, version_id] += 1
        elif label is False:
            disapprovals[day, version_id] += 1
    compared = select(Comparison.created_at).where(
        Comparison.created_at >= start, Comparison.created_at < end
    )
    for created_at in session.scalars(compared):
        comparisons[created_at.astimezone(UTC).date()] += 1
    window = [first + timedelta(days=i) for i in range(days)]
    keys = sorted(set(approvals) | set(disapprovals))
    return Daily(
        days=[DayCounts(day, ratings[day], comparisons[day]) for day in window],
        approval=[
            DayApproval(
                date=day,
                version=names[vid],
                approvals=approvals[day, vid],
                disapprovals=disapprovals[day, vid],
                approval_rate=_rate(
                    approvals[day, vid], approvals[day, vid] + disapprovals[day, vid]
                ),
            )
            for day, vid in keys
        ],
    )


# --- Cached figures -------------------------------------------------------------------------


class StatsCache:
    """Figures kept until the data they are computed from changes.

    Each entry is keyed on what it was computed from (see `data_state`), so a new or changed
    rating, comparison, generation or version makes the next call compute afresh, and nothing
    else does: the dashboard asks every 15 s, and the leaderboard's bootstrap is the costly part.
    Concurrent callers of the same missing entry wait for one computation. Per process; bounded.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._computing: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()
        self.computed = 0
        """Entries computed so far (a miss), for tests and metrics."""

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The entry under `key`, computed with `compute` if it is not kept."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return cast(T, self._entries[key])
            computing = self._computing.setdefault(key, threading.Lock())
        with computing:
            with self._lock:
                if key in self._entries:  # another caller computed it meanwhile
                    return cast(T, self._entries[key])
            value = compute()
            with self._lock:
                self.computed += 1
                self._entries[key] = value
                self._computing.pop(key, None)
                while len(self._entries) > self._max_entries:
                    self._entries.popitem(last=False)
            return value


def _table_state(count_of: Any, *columns: Any) -> list[Any]:
    """Scalar subqueries: the row count and the largest value of each column."""
    return [
        select(func.count()).select_from(count_of).scalar_subquery(),
        *(select(func.max(column)).scalar_subquery() for column in columns),
    ]


def data_state(session: Session) -> dict[str, tuple[Any, ...]]:
    """What the figures depend on, per table, in two cheap queries: the count, largest id and
    latest update of ratings, comparisons and generations (rows are only added or updated, and
    a deletion changes the count), and every version's id, name, status and activation."""
    parts = {
        "feedback": _table_state(Feedback, Feedback.id, Feedback.updated_at),
        "comparisons": _table_state(Comparison, Comparison.id, Comparison.updated_at),
        "generations": _table_state(Generation, Generation.id),
    }
    row = session.execute(select(*(column for part in parts.values() for column in part))).one()
    values = iter(row)
    state = {name: tuple(next(values) for _ in part) for name, part in parts.items()}
    versions = select(
        ModelVersion.id, ModelVersion.name, ModelVersion.status, ModelVersion.activated_at
    ).order_by(ModelVersion.id)
    state["versions"] = tuple(tuple(version) for version in session.execute(versions))
    return state


def cached_version_stats(session: Session, *, cache: StatsCache) -> list[VersionStats]:
    """`version_stats`, computed again only when ratings, comparisons, generations or versions
    changed."""
    state = data_state(session)
    return cache.get(("versions", *state.values()), lambda: version_stats(session))


def cached_leaderboard(session: Session, *, cache: StatsCache, samples: int) -> Leaderboard:
    """`version_leaderboard`, fitted and bootstrapped again only when comparisons or versions
    changed (new generations alone change nothing it shows)."""
    state = data_state(session)
    key = ("leaderboard", samples, state["comparisons"], state["versions"])
    return cache.get(key, lambda: version_leaderboard(session, samples))


def cached_daily(
    session: Session, *, cache: StatsCache, days: int, today: date | None = None
) -> Daily:
    """`daily`, computed again only when ratings, comparisons or versions changed, or the day."""
    state = data_state(session)
    last = today or utcnow().date()
    key = ("daily", days, last, state["feedback"], state["comparisons"], state["versions"])
    return cache.get(key, lambda: daily(session, days=days, today=last))
