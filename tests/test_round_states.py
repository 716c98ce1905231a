"""Rounds as a state machine on PostgreSQL: claimed once, stopped when declared lost, never
overwriting an admin's activation, setting aside the ratings of rounds that keep failing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.config import Settings
from app.ml.checkpoints import write_checkpoint
from app.models import (
    Feedback,
    ModelVersion,
    RunStatus,
    TrainingRun,
    VersionKind,
    VersionStatus,
)
from app.services.training import claim, fail_if_stale, transition
from app.services.versions import activate, ensure_base_version, promote
from tests.conftest import REDIS_TEST_URL, reset_database, wait_until
from tests.test_serving import publish_adapter
from tests.test_training import FAST, QUICK_GATE, RATED, rate_with_corrections, start
from worker.training.rounds import (
    Heartbeat,
    RatingsUsed,
    RoundLost,
    _remove_orphans,
    mark_used,
    run_round,
)


@pytest.fixture
def db_url(pg_url: str) -> str:
    """These rounds run on PostgreSQL, where workers really race."""
    reset_database(pg_url)
    return pg_url


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A small minimum, and a short heartbeat period so a lost round notices within a second."""
    return settings.model_copy(update={"training_min_items": 4, "training_stale_after": 2.0})


def _in_thread(work: Callable[[], RunStatus]) -> tuple[threading.Thread, list[RunStatus]]:
    result: list[RunStatus] = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    return thread, result


def _training(sessions: Any, run_id: int) -> Callable[[], bool]:
    """True once the round has chosen its data (it trains next)."""

    def check() -> bool:
        with sessions() as session:
            run = session.get(TrainingRun, run_id)
            return bool(run and run.status is RunStatus.running and run.counts)

    return check


def _versions(sessions: Any) -> dict[str, str]:
    with sessions() as session:
        return {v.name: v.status.value for v in session.scalars(select(ModelVersion))}


def _used(sessions: Any) -> list[int | None]:
    with sessions() as session:
        return list(session.scalars(select(Feedback.used_in_run_id).order_by(Feedback.id)))


def test_two_workers_handed_the_same_round_run_it_once(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """Two copies of the task at once: one claims and runs the round, the other exits; one
    version, each rating used once; a redelivery after the end does nothing either."""
    settings = settings.model_copy(update={"training_stale_after": 60.0})
    rate_with_corrections(client, admin, RATED)
    run_id = start(sessions, {"train": FAST, "gate": QUICK_GATE})
    barrier = threading.Barrier(2)

    def worker() -> RunStatus:
        barrier.wait()
        return run_round(sessions, settings, run_id)

    threads = [_in_thread(worker) for _ in range(2)]
    for thread, _ in threads:
        thread.join(300)
    statuses = [result[0] for _, result in threads]
    assert RunStatus.succeeded in statuses and RunStatus.failed not in statuses, statuses
    assert _versions(sessions) == {"v0": "retired", "v1": "active"}
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.status is RunStatus.succeeded and run.reason is None
    used = _used(sessions)
    assert used.count(run_id) == run.counts["train_kto"] and set(used) == {run_id, None}

    assert run_round(sessions, settings, run_id) is RunStatus.succeeded  # redelivered late
    assert _versions(sessions) == {"v0": "retired", "v1": "active"} and _used(sessions) == used


def test_a_round_declared_lost_stops_and_publishes_nothing(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """Declared lost by someone else while it trains, the round stops at its next heartbeat,
    publishes nothing, marks nothing used and leaves the run as the other one said."""
    rate_with_corrections(client, admin, RATED)
    slow = {"train": {**FAST, "epochs": 40}, "gate": QUICK_GATE}
    run_id = start(sessions, slow)
    thread, result = _in_thread(lambda: run_round(sessions, settings, run_id))
    wait_until(_training(sessions, run_id), 120, "the round to start training", every=0.1)
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        assert fail_if_stale(session, run, 0)  # as if its heartbeat had stopped
    started = time.monotonic()
    thread.join(300)
    assert result == [RunStatus.failed]
    assert time.monotonic() - started < 30, "the lost round went on training"
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.status is RunStatus.failed and run.live is None
        assert "worker lost" in (run.reason or "") and run.version_id is None
    assert _versions(sessions) == {"v0": "active"}
    assert set(_used(sessions)) == {None}
    leftovers = list(settings.versions_dir.iterdir()) if settings.versions_dir.exists() else []
    assert leftovers == []


def test_an_admin_activation_during_a_round_wins(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """An admin activates another version while a round trains: the round's version is kept as
    a candidate, the admin's choice stays active, and the run says why it did not promote."""
    rate_with_corrections(client, admin, RATED)
    chosen = publish_adapter(sessions, settings, seed=1)  # v1, a candidate
    slow = {"train": {**FAST, "epochs": 10}, "gate": QUICK_GATE}
    run_id = start(sessions, slow)
    thread, result = _in_thread(lambda: run_round(sessions, settings, run_id))
    wait_until(_training(sessions, run_id), 120, "the round to start training", every=0.1)
    response = client.post(f"/v1/models/{chosen}/activate", headers=admin)
    assert response.status_code == 200, response.text
    thread.join(300)

    assert result == [RunStatus.succeeded]  # it passed the gate
    assert _versions(sessions) == {"v0": "retired", "v1": "active", "v2": "candidate"}
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.version is not None and run.version.name == "v2"
        assert f"an admin activated {chosen} during the round" in (run.reason or "")
        assert run.version.status is VersionStatus.candidate
        assert run.version.status_reason == run.reason


def test_rounds_that_keep_failing_set_their_ratings_aside(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """A round that fails in training counts a failure against every rating it took, and so
    does one whose worker is lost; at TRAINING_MAX_ROW_FAILURES (2) they are set aside with the
    reason on the run, and the next round trains on the other ratings without them."""
    rate_with_corrections(client, admin, RATED)
    # Training fails on these ratings; which rating is at fault cannot be told from outside.
    broken = {"train": {**FAST, "target_modules": ["no_such_module"]}, "gate": QUICK_GATE}
    first = start(sessions, broken)
    assert run_round(sessions, settings, first) is RunStatus.failed
    with sessions() as session:
        run = session.get(TrainingRun, first)
        assert run is not None and run.data_ids is not None
        assert "in training" in (run.reason or "") and "set aside" not in (run.reason or "")
        taken = run.data_ids["feedback"]
        assert len(taken) == RATED  # train and held-out alike
        failures = {f.id: f.failures for f in session.scalars(select(Feedback))}
        assert failures == dict.fromkeys(taken, 1)

    # The next round's worker dies after choosing the same ratings; declared lost, it counts too.
    second = start(sessions, broken)
    with sessions() as session:
        assert claim(session, second)
        assert transition(session, second, RunStatus.running, data_ids={"feedback": taken})
        session.commit()
        run = session.get(TrainingRun, second)
        assert run is not None and fail_if_stale(session, run, 0)
        assert "worker lost" in (run.reason or "") and "set aside" in (run.reason or "")
        aside = session.scalars(select(Feedback).where(Feedback.set_aside_at.is_not(None))).all()
        assert sorted(f.id for f in aside) == taken
        assert all(f"the last run {second}" in (f.set_aside_reason or "") for f in aside)

    fresh = rate_with_corrections(client, admin, 6)
    third = start(sessions, {"train": FAST, "gate": QUICK_GATE})
    assert run_round(sessions, settings, third) in (RunStatus.succeeded, RunStatus.rejected)
    with sessions() as session:
        run = session.get(TrainingRun, third)
        assert run is not None and run.data_ids is not None
        assert run.counts["train_kto"] + run.counts["heldout_kto"] == len(fresh)
        assert set(run.data_ids["feedback"]).isdisjoint(taken)
        used = select(Feedback.id).where(Feedback.used_in_run_id.is_not(None))
        assert set(session.scalars(used)).isdisjoint(taken)


def test_a_live_rounds_directory_survives_another_rounds_clean_up(
    sessions: Any, settings: Settings
) -> None:
    """Clean-up removes leftovers of runs that are over, never a directory a live run wrote and
    has not recorded yet."""
    with sessions() as session:
        ensure_base_version(session, settings.model, settings.model)
        live = start(sessions)
        over = TrainingRun(status=RunStatus.failed, trigger="manual")
        session.add(over)
        session.commit()
        over_id = over.id

    def weights(directory: Path) -> None:
        (directory / "weights").write_text("w")

    for name, run_id in [("v1", over_id), ("v2", live)]:
        write_checkpoint(
            settings.versions_dir, name, weights, {"name": name, "training_run": run_id}
        )
    (settings.versions_dir / "stray").mkdir()
    with sessions() as session:
        _remove_orphans(session, settings.versions_dir)
    assert sorted(p.name for p in settings.versions_dir.iterdir()) == ["v2"]


def test_ratings_are_marked_used_only_while_unused(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """A rating another round used meanwhile is not taken over: publication fails instead."""
    ids = rate_with_corrections(client, admin, 2)
    first, second = start(sessions), TrainingRun(status=RunStatus.failed, trigger="manual")
    with sessions() as session:
        session.add(second)
        session.flush()
        feedback = list(session.scalars(select(Feedback.id).order_by(Feedback.id)))
        assert len(feedback) == len(ids)
        mark_used(session, {feedback[0]}, set(), first)
        with pytest.raises(RatingsUsed, match="1 of the round's 2 feedback ratings"):
            mark_used(session, set(feedback), set(), second.id)
        session.rollback()


def test_heartbeats_come_from_a_thread_until_the_run_is_lost(
    sessions: Any, settings: Settings
) -> None:
    """The heartbeat advances with nothing else happening, and notices a run declared lost."""
    run_id = start(sessions)
    with sessions() as session:
        assert claim(session, run_id)
        first = session.get(TrainingRun, run_id).heartbeat_at

    def beat_after(moment: Any) -> bool:
        with sessions() as session:
            run = session.get(TrainingRun, run_id)
            return bool(run and run.heartbeat_at and run.heartbeat_at > moment)

    with Heartbeat(sessions, run_id, 0.1) as heartbeat:
        wait_until(lambda: beat_after(first), 10, "a heartbeat from the thread", every=0.1)
        heartbeat.check()
        with sessions() as session:
            run = session.get(TrainingRun, run_id)
            assert run is not None and fail_if_stale(session, run, 0)
        wait_until(heartbeat.lost.is_set, 10, "the heartbeat to notice", every=0.1)
        with pytest.raises(RoundLost):
            heartbeat.check()


def test_activation_is_compare_and_set(sessions: Any, settings: Settings) -> None:
    """Promotion from a version that is no longer active changes nothing and names the one that
    is; whatever a caller expects, the database never holds two active versions."""
    with sessions() as session:
        v0 = ensure_base_version(session, settings.model, settings.model)
        v1, v2 = (
            ModelVersion(
                name=name,
                kind=VersionKind.base,
                base_model="other",
                path="p",
                status=VersionStatus.candidate,
                manifest={},
            )
            for name in ("v1", "v2")
        )
        session.add_all([v1, v2])
        session.commit()
        activate(session, v1)  # v0 -> v1, as an admin would
        winner = promote(session, v2, v0.id)  # a round that started from v0
        assert winner is not None and winner.name == "v1"
        session.commit()
        assert _versions(sessions) == {"v0": "retired", "v1": "active", "v2": "candidate"}

        with sessions() as other:  # another process rolls back to v0
            activate(other, other.get(ModelVersion, v0.id))
        winner = promote(session, v2, v1.id)  # this session still believes v1 is active
        assert winner is not None and winner.name == "v0"
        session.rollback()
        with pytest.raises(IntegrityError):  # a caller that skips the check meets the index
            promote(session, v2, v2.id)
        session.rollback()
    assert _versions(sessions) == {"v0": "active", "v1": "retired", "v2": "candidate"}


def test_redis_visibility_timeout_outlasts_a_round(settings: Settings) -> None:
    """Celery's Redis visibility timeout is the setting, hours by default; the embedded broker
    (which never hands a task out twice) gets no such option."""
    from worker.celery_app import make_celery

    on_redis = settings.model_copy(update={"redis_url": REDIS_TEST_URL})
    options = make_celery(on_redis).conf.broker_transport_options
    assert options["visibility_timeout"] == settings.training_visibility_timeout
    assert Settings.model_fields["training_visibility_timeout"].default >= 2 * 3600
    assert make_celery(settings).conf.broker_transport_options == {}
