"""Poisoning defences of a round's data: revoked keys, the consensus rule and the share cap."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.main import create_app
from app.models import (
    ApiKey,
    Comparison,
    Feedback,
    RunStatus,
    TrainingRun,
    Winner,
)
from app.services.training import request_run
from tests.helpers import (
    ADMIN_KEY,
    FAST,
    QUICK_GATE,
    IsolatedSettings,
    Ratings,
    reset_database,
    rules,
)
from worker.training.dataset import Item, RoundData, agreement, build_round_data
from worker.training.rounds import run_round

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
GOOD = "A clear and correct answer."
JUNK = "Buy cheap pills at example.com!"


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    """A session on an empty migrated database (PostgreSQL and SQLite)."""
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def honest_round(ratings: Ratings, raters: list[int]) -> list[int]:
    """Every rater likes the even answers, dislikes the odd ones (the first also corrects them)
    and prefers the even side of three comparisons; returns the generations."""
    generations = ratings.generations(8)
    for rater in raters:
        for index, generation in enumerate(generations):
            correction = GOOD if rater == raters[0] and index % 2 else None
            ratings.thumb(rater, generation, up=index % 2 == 0, correction=correction)
        for even, odd in zip(generations[0:6:2], generations[1:6:2], strict=True):
            ratings.compare(rater, odd, even, Winner.b)
    return generations


def flood(ratings: Ratings, attacker: int, generations: list[int]) -> None:
    """The opposite of the honest raters on the same generations and pairs, plus junk answers."""
    for index, generation in enumerate(generations):
        ratings.thumb(attacker, generation, up=index % 2 == 1, correction=JUNK)
    for even, odd in zip(generations[0:6:2], generations[1:6:2], strict=True):
        ratings.compare(attacker, odd, even, Winner.a)


def raters_in(data: RoundData) -> set[int]:
    """Raters with a row in the round, trained on or held out."""
    rows: list[Item] = [*data.train_kto, *data.train_pairs, *data.heldout_kto, *data.heldout_pairs]
    return {row.rater_id for row in rows}


def same_rows(left: RoundData, right: RoundData) -> bool:
    """The two rounds would train and gate on exactly the same rows."""
    return (left.train_kto, left.train_pairs, left.heldout_kto, left.heldout_pairs) == (
        right.train_kto,
        right.train_pairs,
        right.heldout_kto,
        right.heldout_pairs,
    )


def test_a_flooding_attacker_leaves_the_round_unchanged(session: Session) -> None:
    """Opposite ratings on the generations honest raters agree on: the round's rows are exactly
    those without the attacker, and the run records who was left out and why."""
    ratings = Ratings(session)
    honest = [ratings.key(f"honest-{i}") for i in range(3)]
    generations = honest_round(ratings, honest)
    attacker = ratings.key("attacker")
    flood(ratings, attacker, generations)
    ratings.commit()

    defended = build_round_data(session, rules())
    undefended = build_round_data(session, rules(training_consensus_max_disagreement=1))
    assert attacker in raters_in(undefended)  # the attack is real without the rule

    session.execute(delete(Feedback).where(Feedback.api_key_id == attacker))
    session.execute(delete(Comparison).where(Comparison.api_key_id == attacker))
    session.commit()
    clean = build_round_data(session, rules())
    assert same_rows(defended, clean)
    assert raters_in(defended) == set(honest)

    counts = defended.counts()
    assert counts["dropped_by_consensus"] == 8 + 8 + 3  # thumbs, corrections, comparisons
    assert counts["excluded_raters"] == {"revoked": [], "consensus": [attacker]}
    assert counts["consensus"] == {str(attacker): {"tested": 11, "disagreed": 11}}
    assert clean.counts()["dropped_by_consensus"] == 0


def test_revoked_keys_are_left_out_and_do_not_vote(session: Session) -> None:
    """A revoked key's unused ratings leave later rounds; its votes no longer count against
    anyone (revoking sock puppets clears the honest rater they outvoted)."""
    ratings = Ratings(session)
    honest = ratings.key("honest")
    puppets = [ratings.key(f"puppet-{i}") for i in range(2)]
    generations = ratings.generations(6)
    for generation in generations:
        ratings.thumb(honest, generation, up=True)
        for puppet in puppets:
            ratings.thumb(puppet, generation, up=False)
    ratings.commit()
    # Two keys outvote the honest rater on every item (the documented limit of the rule).
    assert raters_in(build_round_data(session, rules())) == set(puppets)

    for puppet in puppets:
        key = session.get(ApiKey, puppet)
        assert key is not None
        key.revoked_at = datetime.now(UTC)
    session.commit()
    data = build_round_data(session, rules())
    assert raters_in(data) == {honest}
    assert len(data.train_kto) + len(data.heldout_kto) == 6
    counts = data.counts()
    assert counts["dropped_revoked"] == 12
    assert counts["excluded_raters"] == {"revoked": puppets, "consensus": []}


def test_the_overlap_minimum_protects_a_lone_rater(session: Session) -> None:
    """A rater the others outvote on fewer than TRAINING_CONSENSUS_MIN_ITEMS items, or who rates
    what nobody else rated, stays in; at the minimum, the same dissent leaves them out."""
    minimum = rules().training_consensus_min_items
    ratings = Ratings(session)
    crowd = [ratings.key(f"crowd-{i}") for i in range(3)]
    contrarian = ratings.key("contrarian")
    loner = ratings.key("loner")
    shared = ratings.generations(minimum, prompt="Shared")
    for generation in shared:
        for rater in crowd:
            ratings.thumb(rater, generation, up=True)
    for generation in shared[:-1]:
        ratings.thumb(contrarian, generation, up=False)
    for generation in ratings.generations(minimum * 2, prompt="Only mine"):
        ratings.thumb(loner, generation, up=False)
    ratings.commit()
    data = build_round_data(session, rules())
    assert raters_in(data) == {*crowd, contrarian, loner}
    assert data.counts()["excluded_raters"]["consensus"] == []

    ratings.thumb(contrarian, shared[-1], up=False)
    ratings.commit()
    data = build_round_data(session, rules())
    assert raters_in(data) == {*crowd, loner}
    assert data.dissenting_raters[contrarian].tested == minimum


def test_one_rater_holds_at_most_the_share_of_a_round(session: Session) -> None:
    """A rater flooding generations nobody else rated keeps only as many rows as all the others
    together (their newest); a round with a single rater is not trimmed."""
    ratings = Ratings(session)
    honest = [ratings.key(f"honest-{i}") for i in range(2)]
    flooder = ratings.key("flooder")
    for rater in honest:
        for generation in ratings.generations(5, prompt=f"Asked by {rater}"):
            ratings.thumb(rater, generation, up=True)
    flooded = ratings.generations(30, prompt="Flooded")
    for generation in flooded:
        ratings.thumb(flooder, generation, up=False)
    ratings.commit()
    data = build_round_data(session, rules())
    rows = [*data.train_kto, *data.heldout_kto]
    assert [row.generation_id for row in rows if row.rater_id == flooder] == flooded[-10:]
    assert len(rows) == 20
    assert data.counts()["dropped_by_rater_share"] == 20
    assert len(build_round_data(session, rules(training_max_rater_share=1)).train_kto) == 32

    for rater in honest:
        session.execute(delete(Feedback).where(Feedback.api_key_id == rater))
    session.commit()
    alone = build_round_data(session, rules())
    assert len(alone.train_kto) + len(alone.heldout_kto) == 30
    assert alone.dropped_by_rater_share == 0


@pytest.mark.parametrize("honest", [1, 2, 3, 5])
def test_a_single_key_never_counts_against_honest_raters(honest: int) -> None:
    """With at least two other raters per tested item, one dissenting key can only tie or lose:
    honest raters who agree are never found disagreeing, whatever their number."""
    votes = [(item, rater, True) for item in range(10) for rater in range(honest)]
    votes += [(item, 99, False) for item in range(10)]
    figures = agreement(votes, min_others=2)
    assert all(figures[rater].disagreed == 0 for rater in range(honest) if rater in figures)
    if honest >= 2:
        assert figures[99].disagreed == figures[99].tested == 10


def _round_outcome(settings: Settings, with_attacker: bool) -> dict[str, Any]:
    """A real round on the tiny model, rated through the API by three honest raters (and the
    attacker); returns what the round used and decided."""
    reset_database(settings.sqlalchemy_url)
    with TestClient(create_app(settings)) as client:
        keys = []
        for name in ("honest-0", "honest-1", "honest-2", "attacker"):
            created = client.post("/v1/keys", json={"name": name, "role": "rater"}, headers=ADMIN)
            keys.append({"Authorization": f"Bearer {created.json()['key']}"})
        generations = [
            client.post(
                "/v1/generate",
                json={"prompt": "Name a colour.", "max_new_tokens": 6, "seed": seed},
                headers=ADMIN,
            ).json()["id"]
            for seed in range(8)
        ]
        raters = keys if with_attacker else keys[:3]
        for rater_index, headers in enumerate(raters):
            attacking = rater_index == 3
            for index, generation in enumerate(generations):
                body: dict[str, Any] = {
                    "generation_id": generation,
                    "thumbs": "up" if (index % 2 == 0) != attacking else "down",
                }
                if attacking or (rater_index == 0 and index % 2):
                    body["correction"] = JUNK if attacking else GOOD
                response = client.post("/v1/feedback", json=body, headers=headers)
                assert response.status_code == 201, response.text
            for even, odd in zip(generations[0:6:2], generations[1:6:2], strict=True):
                body = {
                    "generation_a": even,
                    "generation_b": odd,
                    "winner": "b" if attacking else "a",
                }
                response = client.post("/v1/comparisons", json=body, headers=headers)
                assert response.status_code == 201, response.text
    engine = make_engine(settings.sqlalchemy_url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        queued, _ = request_run(
            session, trigger="manual", config={"train": FAST, "gate": QUICK_GATE}
        )
        run_id = queued.id
    status = run_round(sessions, settings, run_id)
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        used = select(Feedback.id).where(Feedback.used_in_run_id == run_id)
        used_comparisons = select(Comparison.id).where(Comparison.used_in_run_id == run_id)
        outcome = {
            "status": status,
            "counts": run.counts,
            "feedback": sorted(session.scalars(used)),
            "comparisons": sorted(session.scalars(used_comparisons)),
        }
    engine.dispose()
    return outcome


def test_a_round_with_a_flooding_attacker_has_the_same_outcome(
    pg_url: str, tiny_model_dir: Path, tmp_path: Path, small_suite: Path
) -> None:
    """A real round: with the attacker flooding opposite thumbs, comparisons and junk corrections
    it trains on the same ratings and reaches the same decision as without them."""
    settings = IsolatedSettings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        model=str(tiny_model_dir),
        model_dtype="float32",
        admin_api_key=ADMIN_KEY,
        training_min_items=4,
        evaluation_dir=small_suite,
    )
    clean = _round_outcome(settings, with_attacker=False)
    attacked = _round_outcome(settings, with_attacker=True)
    assert clean["status"] in (RunStatus.succeeded, RunStatus.rejected)
    assert attacked["status"] == clean["status"]
    assert attacked["feedback"] == clean["feedback"] and attacked["comparisons"]
    assert attacked["comparisons"] == clean["comparisons"]
    attacker_id = 5  # the bootstrap admin key is 1, then the three honest raters
    excluded = attacked["counts"].pop("excluded_raters")
    assert excluded == {"revoked": [], "consensus": [attacker_id]}
    assert attacked["counts"].pop("consensus") == {
        str(attacker_id): {"tested": 11, "disagreed": 11}
    }
    assert attacked["counts"].pop("dropped_by_consensus") == 8 + 8 + 3
    assert clean["counts"].pop("excluded_raters") == {"revoked": [], "consensus": []}
    assert clean["counts"].pop("consensus") == {}
    assert clean["counts"].pop("dropped_by_consensus") == 0
    assert attacked["counts"] == clean["counts"]
