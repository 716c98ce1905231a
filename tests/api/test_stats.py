"""Dashboard statistics: per-version figures, the Bradley-Terry leaderboard, daily activity."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.models import (
    Comparison,
    Feedback,
    Generation,
    ModelVersion,
    VersionKind,
    VersionStatus,
)
from app.services import leaderboard, stats
from app.services.stats import wilson_interval

Sessions = sessionmaker[Session]
Headers = dict[str, str]


# --- helpers --------------------------------------------------------------------------------


def generate(client: TestClient, headers: Headers, prompt: str, seed: int) -> int:
    """A short sampled generation's id; the same prompt with other seeds answers the same input."""
    body = {"prompt": prompt, "max_new_tokens": 2, "temperature": 1.0, "seed": seed}
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 200, response.text
    gid: int = response.json()["id"]
    return gid


def new_key(client: TestClient, admin: Headers, name: str) -> Headers:
    """Headers of a fresh rater key (it rates everyone's generations, as a second rater does)."""
    response = client.post("/v1/keys", json={"name": name, "role": "rater"}, headers=admin)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


def add_version(sessions: Sessions, name: str, status: VersionStatus) -> None:
    """An adapter version row (never `active`, so the app keeps serving the base)."""
    with sessions() as session:
        session.add(
            ModelVersion(
                name=name,
                kind=VersionKind.adapter,
                base_model="test",
                path=f"/nonexistent/{name}",
                status=status,
                manifest={},
            )
        )
        session.commit()


def attribute(sessions: Sessions, generation_ids: list[int], version: str) -> None:
    """Record these generations as produced by `version`, to simulate traffic on it."""
    with sessions() as session:
        vid = session.scalar(select(ModelVersion.id).where(ModelVersion.name == version))
        session.execute(
            update(Generation).where(Generation.id.in_(generation_ids)).values(model_version_id=vid)
        )
        session.commit()


def rate(client: TestClient, headers: Headers, gid: int, **fields: Any) -> int:
    """Rate a generation; returns the feedback id."""
    response = client.post("/v1/feedback", json={"generation_id": gid, **fields}, headers=headers)
    assert response.status_code == 201, response.text
    fid: int = response.json()["id"]
    return fid


def compare(client: TestClient, headers: Headers, a: int, b: int, winner: str) -> int:
    """Compare two generations; returns the comparison id."""
    body = {"generation_a": a, "generation_b": b, "winner": winner}
    response = client.post("/v1/comparisons", json=body, headers=headers)
    assert response.status_code == 201, response.text
    cid: int = response.json()["id"]
    return cid


def get(client: TestClient, headers: Headers, path: str, **params: Any) -> Any:
    """GET a stats endpoint, expecting 200."""
    response = client.get(f"/v1/stats/{path}", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


# --- /v1/stats/versions ---------------------------------------------------------------------


def test_version_stats_count_rates_and_intervals(
    client: TestClient, user: Headers, admin: Headers, sessions: Sessions
) -> None:
    """Counts, approval rate with its Wilson interval, mean stars and win rate, per version."""
    other = new_key(client, admin, "second rater")
    g = [generate(client, user, "Name a colour.", seed) for seed in range(1, 7)]
    add_version(sessions, "v1", VersionStatus.retired)
    add_version(sessions, "v2", VersionStatus.candidate)  # no traffic at all
    attribute(sessions, g[3:], "v1")
    v0_gens, v1_gens = g[:3], g[3:]

    # v0: the thumb decides over stars; 3 stars says nothing; its third generation is unrated.
    rate(client, user, v0_gens[0], thumbs="up", stars=2)  # approval
    rate(client, other, v0_gens[0], stars=5)  # approval
    rate(client, user, v0_gens[1], thumbs="down")  # disapproval
    rate(client, other, v0_gens[1], stars=3)  # neither
    # v1: a correction alone is a rating but neither approval nor disapproval.
    rate(client, user, v1_gens[0], stars=4)  # approval
    rate(client, user, v1_gens[1], stars=1)  # disapproval
    rate(client, user, v1_gens[2], correction="A completely different answer.")

    compare(client, user, v0_gens[0], v1_gens[0], "b")  # v1 wins
    compare(client, user, v0_gens[1], v1_gens[1], "tie")
    compare(client, other, v1_gens[2], v0_gens[2], "a")  # v1 wins
    compare(client, user, v0_gens[0], v0_gens[1], "a")  # same version: not counted
    compare(client, other, v1_gens[0], v1_gens[2], "b")  # same version: not counted

    data = get(client, user, "versions")["data"]
    assert [v["name"] for v in data] == ["v0", "v1", "v2"]
    v0, v1, v2 = data
    assert set(v0) == {
        "name", "kind", "status", "created_at", "activated_at", "generations",
        "rated_generations", "ratings", "approvals", "disapprovals", "approval_rate",
        "approval_ci", "stars_count", "mean_stars", "comparisons", "wins", "losses", "ties",
        "win_rate",
    }  # fmt: skip
    assert (v0["kind"], v0["status"]) == ("base", "active")
    assert v0["activated_at"] is not None
    assert (v1["kind"], v1["status"], v1["activated_at"]) == ("adapter", "retired", None)
    assert (v2["kind"], v2["status"]) == ("adapter", "candidate")

    counts = ("generations", "rated_generations", "ratings", "approvals", "disapprovals")
    assert [v0[k] for k in counts] == [3, 2, 4, 2, 1]
    assert [v1[k] for k in counts] == [3, 3, 3, 1, 1]
    assert v0["approval_rate"] == pytest.approx(2 / 3)
    assert v1["approval_rate"] == pytest.approx(1 / 2)
    # Wilson 95%: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964.
    assert v0["approval_ci"] == pytest.approx([0.207660, 0.938508], abs=1e-6)
    assert v1["approval_ci"] == pytest.approx([0.094531, 0.905469], abs=1e-6)
    assert (v0["stars_count"], v0["mean_stars"]) == (3, pytest.approx((2 + 5 + 3) / 3))
    assert (v1["stars_count"], v1["mean_stars"]) == (2, pytest.approx(2.5))

    record = ("comparisons", "wins", "losses", "ties")
    assert [v0[k] for k in record] == [3, 0, 2, 1]
    assert [v1[k] for k in record] == [3, 2, 0, 1]
    assert v0["win_rate"] == pytest.approx(0.5 / 3)
    assert v1["win_rate"] == pytest.approx(2.5 / 3)

    assert {k: v for k, v in v2.items() if k not in ("name", "kind", "status", "created_at")} == {
        "activated_at": None, "generations": 0, "rated_generations": 0, "ratings": 0,
        "approvals": 0, "disapprovals": 0, "approval_rate": None, "approval_ci": None,
        "stars_count": 0, "mean_stars": None, "comparisons": 0, "wins": 0, "losses": 0,
        "ties": 0, "win_rate": None,
    }  # fmt: skip


def test_wilson_interval_matches_hand_computation() -> None:
    """The Wilson interval against the formula, and its edge cases."""
    z = 1.959963984540054
    for successes, trials in [(2, 3), (0, 5), (5, 5), (37, 120)]:
        p = successes / trials
        denominator = 1 + z**2 / trials
        centre = (p + z**2 / (2 * trials)) / denominator
        half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denominator
        assert wilson_interval(successes, trials) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(0, 5) or (None, None)
    assert low == 0.0 and high == pytest.approx(0.434482, abs=1e-6)  # z²/(n+z²)


# --- /v1/stats/leaderboard ------------------------------------------------------------------


def test_leaderboard_ranks_versions_from_cross_version_comparisons(
    client: TestClient, user: Headers, admin: Headers, sessions: Sessions
) -> None:
    """v2 beats everyone every time, v1 mostly beats v0: that order, finite scores, exact
    records, mean 1000, the fit's score equations hold, and intervals are reproducible."""
    other = new_key(client, admin, "second rater")
    g = [generate(client, user, "Name an animal.", seed) for seed in range(1, 13)]
    for name in ("v1", "v2", "v3"):
        add_version(sessions, name, VersionStatus.retired)
    v0_gens, v1_gens, v2_gens = g[0:4], g[4:8], g[8:12]
    attribute(sessions, v1_gens, "v1")
    attribute(sessions, v2_gens, "v2")

    # v1 against v0: 16 pairs, v1 wins 12, v0 wins 3, one tie (the tie is the last pair).
    pairs = [(a, b) for a in v1_gens for b in v0_gens]
    for k, (a, b) in enumerate(pairs):
        compare(client, user, a, b, "a" if k < 12 else ("b" if k < 15 else "tie"))
    # v2 wins all of its 32 comparisons, written with v2 on either side.
    for a in v2_gens:
        for b in v1_gens:
            compare(client, user, b, a, "b")
        for b in v0_gens:
            compare(client, other, a, b, "a")
    compare(client, other, v1_gens[0], v1_gens[1], "a")  # same version: not counted

    board = get(client, user, "leaderboard")
    rows = board["data"]
    assert board["comparisons"] == 48
    assert isinstance(board["method"], str) and "Bradley-Terry" in board["method"]
    assert [(r["rank"], r["name"]) for r in rows] == [(1, "v2"), (2, "v1"), (3, "v0")]
    by_name = {r["name"]: r for r in rows}
    record = ("battles", "wins", "losses", "ties")
    assert [by_name["v2"][k] for k in record] == [32, 32, 0, 0]
    assert [by_name["v1"][k] for k in record] == [32, 12, 19, 1]
    assert [by_name["v0"][k] for k in record] == [32, 3, 28, 1]

    scores = {r["name"]: r["score"] for r in rows}
    assert all(math.isfinite(s) for s in scores.values())
    assert sum(scores.values()) / 3 == pytest.approx(1000)
    assert scores["v2"] > scores["v1"] + 100 > scores["v0"] + 200
    # At the optimum each version's expected score plus the prior's pull, PRIOR * theta, equals
    # its actual one (wins + ties/2); theta is the score in natural-log odds around the mean.
    battles = {("v1", "v0"): 16, ("v2", "v1"): 16, ("v2", "v0"): 16}
    for name, row in by_name.items():
        expected = 0.0
        for (x, y), n in battles.items():
            if name in (x, y):
                opponent = y if name == x else x
                expected += n / (1 + 10 ** ((scores[opponent] - scores[name]) / 400))
        theta = (scores[name] - 1000) / leaderboard.ELO_PER_NAT
        pull = leaderboard.PRIOR * theta
        assert expected + pull == pytest.approx(row["wins"] + row["ties"] / 2, abs=0.01), name

    for row in rows:
        assert row["ci_low"] <= row["score"] <= row["ci_high"], row
    assert get(client, user, "leaderboard") == board  # the same seed, the same intervals
    bare = get(client, user, "leaderboard", samples=0)
    assert [(r["name"], r["ci_low"], r["ci_high"]) for r in bare["data"]] == [
        ("v2", None, None),
        ("v1", None, None),
        ("v0", None, None),
    ]
    assert [r["score"] for r in bare["data"]] == [r["score"] for r in rows]


def test_leaderboard_without_cross_version_comparisons_is_empty(
    client: TestClient, user: Headers
) -> None:
    """Comparisons within one version rank nobody."""
    one, two = (generate(client, user, "Name a tree.", seed) for seed in (1, 2))
    compare(client, user, one, two, "a")
    board = get(client, user, "leaderboard")
    assert (board["data"], board["comparisons"]) == ([], 0)


def simulate(
    rng: np.random.Generator, theta: np.ndarray, games: int, tie_rate: float
) -> leaderboard.Outcomes:
    """Random pairings of players with Bradley-Terry outcomes, some ties, aggregated."""
    n = len(theta)
    first = rng.integers(0, n, games)
    second = (first + rng.integers(1, n, games)) % n  # never the same player
    p_first = 1 / (1 + np.exp(theta[second] - theta[first]))
    draw = rng.random(games)
    result = np.where(draw < tie_rate, 0.5, (rng.random(games) < p_first).astype(float))
    keys, count = np.unique(np.stack([first, second, result * 2]), axis=1, return_counts=True)
    return leaderboard.Outcomes(
        first=keys[0].astype(np.int64),
        second=keys[1].astype(np.int64),
        result=keys[2] / 2,
        count=count.astype(np.float64),
        players=n,
    )


def test_bradley_terry_fit_recovers_known_strengths() -> None:
    """With plenty of simulated games the fit recovers the strengths that generated them, and
    the bootstrap intervals cover them and are reproducible."""
    rng = np.random.default_rng(7)
    truth = np.array([-1.5, -0.5, 0.0, 0.3, 1.0, 2.0])
    truth -= truth.mean()
    outcomes = simulate(rng, truth, 30_000, tie_rate=0.0)
    theta = leaderboard.fit(outcomes.wins())
    assert theta == pytest.approx(truth, abs=0.08)
    assert theta.sum() == pytest.approx(0, abs=1e-6)

    expected_scores = 1000 + truth * 400 / math.log(10)
    boot = leaderboard.bootstrap_scores(outcomes, 300)
    assert boot.shape == (300, 6)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    assert (low < expected_scores).all() and (expected_scores < high).all()
    assert np.array_equal(boot, leaderboard.bootstrap_scores(outcomes, 300))


def test_bradley_terry_ties_and_unbeaten_players() -> None:
    """Ties count half a win each (all ties: equal strengths); a player that never loses gets a
    finite, highest score."""
    tied = leaderboard.fit(np.array([[0.0, 5.0], [5.0, 0.0]]))
    assert tied == pytest.approx([0.0, 0.0], abs=1e-9)

    ties_only = leaderboard.Outcomes(
        first=np.array([0]), second=np.array([1]), result=np.array([0.5]),
        count=np.array([10.0]), players=2,
    )  # fmt: skip
    assert ties_only.wins() == pytest.approx(np.array([[0.0, 5.0], [5.0, 0.0]]))

    wins = np.array([[0.0, 20.0, 20.0], [0.0, 0.0, 10.0], [0.0, 10.0, 0.0]])
    theta = leaderboard.fit(wins)
    assert np.isfinite(theta).all()
    assert theta[0] > theta[1] + 2
    assert theta[1] == pytest.approx(theta[2])
    scores = leaderboard.scores(theta)
    assert scores.mean() == pytest.approx(1000)
    assert scores[0] - scores[1] == pytest.approx((theta[0] - theta[1]) * 400 / math.log(10))


# --- /v1/stats/daily ------------------------------------------------------------------------


def set_created(sessions: Sessions, table: type[Feedback] | type[Comparison], rid: int,
                when: datetime) -> None:  # fmt: skip
    """Backdate a rating."""
    with sessions() as session:
        row = session.get(table, rid)
        assert row is not None
        row.created_at = when
        session.commit()


def test_daily_buckets_by_utc_day(
    client: TestClient, user: Headers, admin: Headers, sessions: Sessions
) -> None:
    """Every day of the window with its counts, zeros included, and approval per day and
    version; the window's edges are whole UTC days."""
    other = new_key(client, admin, "second rater")
    today = datetime.now(UTC).date()

    def at(days_ago: int, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
        day = today - timedelta(days=days_ago)
        return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=UTC)

    g = [generate(client, user, "Name a river.", seed) for seed in range(1, 6)]
    add_version(sessions, "v1", VersionStatus.retired)
    attribute(sessions, [g[3], g[4]], "v1")

    fid = rate(client, user, g[0], thumbs="up")
    set_created(sessions, Feedback, fid, at(2, 0, 0, 0))  # first instant of the day
    fid = rate(client, other, g[0], stars=1)
    set_created(sessions, Feedback, fid, at(2, 23, 59, 59))  # last second of the same day
    fid = rate(client, user, g[1], stars=3)  # a rating without approval or disapproval
    set_created(sessions, Feedback, fid, at(5))
    fid = rate(client, user, g[3], thumbs="up")
    set_created(sessions, Feedback, fid, at(2, 8))
    fid = rate(client, user, g[4], thumbs="down")
    set_created(sessions, Feedback, fid, at(6, 0, 0, 0))  # the window's first day
    fid = rate(client, user, g[2], thumbs="down")
    set_created(sessions, Feedback, fid, at(7, 23, 59, 59))  # the day before the window
    rate(client, other, g[2], thumbs="up")  # today
    cid = compare(client, user, g[0], g[3], "a")
    set_created(sessions, Comparison, cid, at(1))
    cid = compare(client, user, g[1], g[4], "b")
    set_created(sessions, Comparison, cid, at(1, 23, 30))
    compare(client, other, g[0], g[1], "tie")  # today

    body = get(client, user, "daily", days=7)
    assert set(body) == {"days", "approval"}
    iso = [(today - timedelta(days=n)).isoformat() for n in range(6, -1, -1)]
    assert body["days"] == [
        {"date": iso[0], "ratings": 1, "comparisons": 0},  # 6 days ago
        {"date": iso[1], "ratings": 1, "comparisons": 0},  # 5
        {"date": iso[2], "ratings": 0, "comparisons": 0},
        {"date": iso[3], "ratings": 0, "comparisons": 0},
        {"date": iso[4], "ratings": 3, "comparisons": 0},  # 2
        {"date": iso[5], "ratings": 0, "comparisons": 2},  # 1
        {"date": iso[6], "ratings": 1, "comparisons": 1},  # today
    ]
    assert body["approval"] == [
        {"date": iso[0], "version": "v1", "approvals": 0, "disapprovals": 1, "approval_rate": 0.0},
        {"date": iso[4], "version": "v0", "approvals": 1, "disapprovals": 1, "approval_rate": 0.5},
        {"date": iso[4], "version": "v1", "approvals": 1, "disapprovals": 0, "approval_rate": 1.0},
        {"date": iso[6], "version": "v0", "approvals": 1, "disapprovals": 0, "approval_rate": 1.0},
    ]

    default = get(client, user, "daily")
    assert len(default["days"]) == 30
    assert default["days"][-1]["date"] == today.isoformat()
    assert sum(d["ratings"] for d in default["days"]) == 7
    assert date.fromisoformat(default["days"][0]["date"]) == today - timedelta(days=29)
    one = get(client, user, "daily", days=1)
    assert one["days"] == [{"date": iso[6], "ratings": 1, "comparisons": 1}]


# --- access and validation ------------------------------------------------------------------


def test_stats_need_a_key(client: TestClient, user: Headers) -> None:
    """Every stats endpoint is 401 without a key or with an unknown one, 200 with a user key."""
    for path in ("versions", "leaderboard", "daily"):
        assert client.get(f"/v1/stats/{path}").status_code == 401, path
        bad = {"Authorization": "Bearer not-a-key"}
        assert client.get(f"/v1/stats/{path}", headers=bad).status_code == 401, path
        assert client.get(f"/v1/stats/{path}", headers=user).status_code == 200, path


BAD_PARAMETERS: list[tuple[str, dict[str, Any], str]] = [
    ("leaderboard", {"samples": -1}, "samples"),
    ("leaderboard", {"samples": 2001}, "samples"),
    ("leaderboard", {"samples": "many"}, "samples"),
    ("leaderboard", {"samples": 1.5}, "samples"),
    ("daily", {"days": 0}, "days"),
    ("daily", {"days": 367}, "days"),
    ("daily", {"days": -3}, "days"),
    ("daily", {"days": ""}, "days"),
    ("daily", {"days": 10**30}, "days"),
]


def test_bad_query_parameters_are_422_naming_them(client: TestClient, user: Headers) -> None:
    """An out-of-range or non-integer parameter is a 422 whose detail names it."""
    tolerant = TestClient(client.app, raise_server_exceptions=False)
    for path, params, field in BAD_PARAMETERS:
        response = tolerant.get(f"/v1/stats/{path}", params=params, headers=user)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", field], params


def test_empty_database(client: TestClient, user: Headers) -> None:
    """With no traffic: the base version with zeros, an empty leaderboard, a window of zeros."""
    (v0,) = get(client, user, "versions")["data"]
    assert (v0["name"], v0["generations"], v0["ratings"], v0["approval_ci"]) == ("v0", 0, 0, None)
    board = get(client, user, "leaderboard", samples=2000)
    assert (board["data"], board["comparisons"]) == ([], 0)
    daily = get(client, user, "daily", days=366)
    assert len(daily["days"]) == 366 and daily["approval"] == []
    assert all(d["ratings"] == d["comparisons"] == 0 for d in daily["days"])


# --- caching --------------------------------------------------------------------------------


def test_figures_are_kept_until_the_data_changes(
    client: TestClient, user: Headers, admin: Headers, sessions: Sessions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The dashboard asks every 15 s: the leaderboard's bootstrap and the per-version figures
    are computed once per state of the data, and again as soon as a rating, a comparison, a
    generation or a version changes (only what each figure depends on)."""
    calls = {"bootstrap": 0, "versions": 0, "daily": 0}

    def counting(name: str, function: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(
        leaderboard, "bootstrap_scores", counting("bootstrap", leaderboard.bootstrap_scores)
    )
    monkeypatch.setattr(stats, "version_stats", counting("versions", stats.version_stats))
    monkeypatch.setattr(stats, "daily", counting("daily", stats.daily))
    rater = new_key(client, admin, "rater")
    g = [generate(client, user, "Name a stone.", seed) for seed in range(1, 5)]
    add_version(sessions, "v1", VersionStatus.retired)
    attribute(sessions, g[2:], "v1")
    compare(client, rater, g[0], g[2], "b")

    def figures() -> tuple[Any, Any, Any]:
        return (
            get(client, user, "leaderboard", samples=50),
            get(client, user, "versions")["data"],
            get(client, user, "daily", days=3),
        )

    board, versions, daily = figures()
    for _ in range(3):
        assert figures() == (board, versions, daily)
    assert calls == {"bootstrap": 1, "versions": 1, "daily": 1}
    assert get(client, user, "leaderboard", samples=60)["comparisons"] == 1  # other samples
    assert calls["bootstrap"] == 2

    generate(client, user, "Name a stone.", 9)  # a new generation: traffic, not the board
    board2, versions2, daily2 = figures()
    assert (board2, daily2) == (board, daily) and calls["bootstrap"] == 2
    assert versions2[0]["generations"] == versions[0]["generations"] + 1

    compare(client, rater, g[1], g[3], "a")  # a new comparison
    board3, _, daily3 = figures()
    assert board3["comparisons"] == 2 and calls["bootstrap"] == 3
    assert daily3["days"][-1]["comparisons"] == 2

    body = {"generation_a": g[1], "generation_b": g[3], "winner": "b"}  # that choice changed
    assert client.post("/v1/comparisons", json=body, headers=rater).status_code == 200
    board4, versions4, _ = figures()
    assert calls["bootstrap"] == 4
    assert {r["name"]: r["wins"] for r in board4["data"]} == {"v1": 2, "v0": 0}
    assert versions4[1]["wins"] == 2

    rate(client, rater, g[0], thumbs="up")  # a new rating
    _, versions5, daily5 = figures()
    assert versions5[0]["ratings"] == 1 and daily5["days"][-1]["ratings"] == 1
    assert calls["bootstrap"] == 4  # ratings do not move the leaderboard

    with sessions() as session:  # a version's status changed (an activation, a refusal)
        version = session.scalars(select(ModelVersion).where(ModelVersion.name == "v1")).one()
        version.status = VersionStatus.refused
        session.commit()
    assert get(client, user, "versions")["data"][1]["status"] == "refused"
