"""Rounds as a state machine on PostgreSQL: claimed once, stopped when declared lost, never
overwriting an admin's activation; a failed round charging only the batch of ratings it was in,
setting aside those that keep failing, until an admin restores them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from app.config import Settings
from app.db import utcnow
from app.engine.checkpoints import write_checkpoint
from app.models import (
    Comparison,
    Feedback,
    ModelVersion,
    RunStatus,
    TrainingRun,
    VersionKind,
    VersionStatus,
)
from app.services.datasets import kto_rows, pair_rows
from app.services.training import claim, fail_if_stale, request_run
from app.services.versions import activate, ensure_base_version, promote
from tests.helpers import (
    FAST,
    QUICK_GATE,
    RATED,
    REDIS_TEST_URL,
    publish_adapter,
    rate_with_corrections,
    reset_database,
    start,
    version_statuses,
    wait_until,
)
from worker.training import gate, rounds, train
from worker.training.rounds import (
    Heartbeat,
    RatingsUsed,
    RoundLost,
    _remove_orphans,
    mark_used,
    run_round,
    version_directory,
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
    assert version_statuses(sessions) == {"v0": "retired", "v1": "active"}
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.status is RunStatus.succeeded and run.reason is None
    used = _used(sessions)
    assert used.count(run_id) == run.counts["train_kto"] and set(used) == {run_id, None}

    assert run_round(sessions, settings, run_id) is RunStatus.succeeded  # redelivered late
    assert version_statuses(sessions) == {"v0": "retired", "v1": "active"}
    assert _used(sessions) == used


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
        assert fail_if_stale(session, run=run, stale_after=0)  # as if its heartbeat had stopped
    started = time.monotonic()
    thread.join(300)
    assert result == [RunStatus.failed]
    assert time.monotonic() - started < 30, "the lost round went on training"
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.status is RunStatus.failed and run.live is None
        assert "worker lost" in (run.reason or "") and run.version_id is None
    assert version_statuses(sessions) == {"v0": "active"}
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
    assert version_statuses(sessions) == {"v0": "retired", "v1": "active", "v2": "candidate"}
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.version is not None and run.version.name == "v2"
        assert f"an admin activated {chosen} during the round" in (run.reason or "")
        assert run.version.status is VersionStatus.candidate
        assert run.version.status_reason == run.reason


POISON = "A poisoned answer that no forward pass survives."
"""A correction whose pair makes any forward pass over it fail (see `poison`)."""
PAIRS_OF_TWO = {"train": {**FAST, "batch_size": 2}, "gate": QUICK_GATE}
"""Micro-batches of two rows (with `two_pairs`' budget): a failing one holds the poisoned rating
and one other."""


def two_pairs(settings: Settings) -> Settings:
    """A token budget that holds two DPO pairs (four sequences) in a micro-batch."""
    return settings.model_copy(update={"training_batch_tokens": 4 * settings.training_max_length})


def rate_poisoned(client: TestClient, headers: dict[str, str]) -> int:
    """A generation rated down and corrected to POISON (before the others: it is trained on, not
    held out); the feedback's id."""
    body = {"prompt": "Which answer is poisoned?", "max_new_tokens": 6, "seed": 99}
    generation = client.post("/v1/generate", json=body, headers=headers).json()
    rating = {"generation_id": generation["id"], "thumbs": "down", "correction": POISON}
    response = client.post("/v1/feedback", json=rating, headers=headers)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def poison(monkeypatch: pytest.MonkeyPatch, settings: Settings, act: Callable[[], None]) -> None:
    """Call `act` (raise, or hang) on every forward pass of a round's models over POISON: as a
    rating that makes a worker run out of memory would."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    load = train.load_base

    def check(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and any(POISON in tokenizer.decode(row) for row in ids.tolist()):
            act()

    def poisoned(path: Path) -> Any:
        model = load(path)
        # On the decoder stack: training calls it through the model, the gate directly.
        model.get_decoder().register_forward_pre_hook(check, with_kwargs=True)
        return model

    monkeypatch.setattr(train, "load_base", poisoned)


def _failures(sessions: Any) -> dict[int, tuple[int, bool]]:
    """Each feedback's (failures, set aside)."""
    with sessions() as session:
        rows = session.scalars(select(Feedback))
        return {f.id: (f.failures, f.set_aside_at is not None) for f in rows}


@pytest.mark.parametrize("phase", ["training", "gate"])
def test_a_round_failing_in_a_batch_charges_only_that_batch(
    phase: str,
    client: TestClient,
    admin: dict[str, str],
    sessions: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rating that makes a round fail (a MemoryError halfway: in training, KTO passes and DPO
    fails on its pair; in the gate, on the held-out pairs) costs a failure to the ratings of that
    batch only, which the run records; at TRAINING_MAX_ROW_FAILURES (1 here) they are set aside,
    saying why, and the next round takes every other rating."""
    settings = two_pairs(settings.model_copy(update={"training_max_row_failures": 1}))
    if phase == "training":  # the oldest rating: trained on
        poisoned = rate_poisoned(client, admin)
        rate_with_corrections(client, admin, RATED - 1)
    else:  # the newest: held out for the gate
        rate_with_corrections(client, admin, RATED - 1)
        poisoned = rate_poisoned(client, admin)

    def out_of_memory() -> None:
        raise MemoryError("poisoned")

    poison(monkeypatch, settings, out_of_memory)
    first = start(sessions, PAIRS_OF_TWO)
    assert run_round(sessions, settings, first) is RunStatus.failed
    failures = _failures(sessions)
    charged = sorted(i for i, (count, _) in failures.items() if count)
    assert poisoned in charged and len(charged) == 2, failures  # the poison and its batch mate
    assert failures == {i: (1, True) if i in charged else (0, False) for i in failures}
    with sessions() as session:
        run = session.get(TrainingRun, first)
        assert run is not None and run.data_ids is not None
        assert run.batch_ids == {"feedback": charged, "comparisons": []}
        assert len(run.data_ids["feedback"]) == RATED  # it took them all, train and held-out
        reason = run.reason or ""
        assert f"MemoryError in {phase}: poisoned" in reason, reason
        assert f"the batch it was in: feedback {charged[0]}, {charged[1]}" in reason, reason
        assert "set aside" in reason
        aside = session.scalars(select(Feedback).where(Feedback.set_aside_at.is_not(None)))
        assert all(f"the last run {first}" in (f.set_aside_reason or "") for f in aside)

    second = start(sessions, PAIRS_OF_TWO)
    assert run_round(sessions, settings, second) in (RunStatus.succeeded, RunStatus.rejected)
    with sessions() as session:
        run = session.get(TrainingRun, second)
        assert run is not None and run.data_ids is not None
        assert sorted(run.data_ids["feedback"]) == sorted(set(failures) - set(charged))
        assert run.batch_ids is None
    assert _failures(sessions) == failures  # a round that succeeds charges nothing


def test_a_round_declared_lost_charges_only_the_batch_it_was_in(
    client: TestClient,
    admin: dict[str, str],
    sessions: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round whose worker hangs on a rating (as one killed or out of memory would stop beating)
    and is declared lost costs a failure to the ratings of the batch it was in, as recorded on
    the run before the batch began, and to no other; it then publishes nothing."""
    settings = two_pairs(settings)
    poisoned = rate_poisoned(client, admin)
    rate_with_corrections(client, admin, RATED - 1)
    stuck, release = threading.Event(), threading.Event()

    def hang() -> None:
        stuck.set()
        release.wait(120)

    poison(monkeypatch, settings, hang)
    run_id = start(sessions, PAIRS_OF_TWO)
    thread, result = _in_thread(lambda: run_round(sessions, settings, run_id))
    try:
        assert stuck.wait(180), "the round never reached the poisoned rating"
        with sessions() as session:
            run = session.get(TrainingRun, run_id)
            # its heartbeat stopped
            assert run is not None and fail_if_stale(session, run=run, stale_after=0)
        failures = _failures(sessions)
    finally:
        release.set()
        thread.join(300)
    assert result == [RunStatus.failed]
    charged = sorted(i for i, (count, _) in failures.items() if count)
    assert poisoned in charged and len(charged) == 2, failures  # the poison and its batch mate
    assert failures == {i: (1, False) if i in charged else (0, False) for i in failures}
    assert _failures(sessions) == failures  # the round, once it noticed, charged nothing more
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.batch_ids == {"feedback": charged, "comparisons": []}
        reason = run.reason or ""
    assert "worker lost" in reason and f"the batch it was in: feedback {charged[0]}" in reason
    assert "set aside" not in reason  # one failure of TRAINING_MAX_ROW_FAILURES (2)
    assert version_statuses(sessions) == {"v0": "active"} and set(_used(sessions)) == {None}


def _declare_lost_while_writing(monkeypatch: pytest.MonkeyPatch, sessions: Any) -> None:
    write = rounds.write_checkpoint

    def write_and_be_lost(*args: Any, **kwargs: Any) -> Path:
        with sessions() as session:
            run = session.scalars(select(TrainingRun).where(TrainingRun.live.is_(True))).one()
            assert fail_if_stale(session, run=run, stale_after=0)  # its worker stopped beating
        return write(*args, **kwargs)

    monkeypatch.setattr(rounds, "write_checkpoint", write_and_be_lost)


def _raise(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError(f"in {name}")

    monkeypatch.setattr(target, name, fail)


@pytest.mark.parametrize(
    ("moment", "phase"),
    [
        ("loading the model", "MemoryError in training"),
        ("the gate's fixed prompts", "MemoryError in gate"),
        ("publishing, declared lost", "worker lost"),
        ("publishing, an error", "MemoryError in publishing"),
    ],
)
def test_a_round_failing_outside_any_batch_charges_no_rating(
    moment: str,
    phase: str,
    client: TestClient,
    admin: dict[str, str],
    sessions: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure no rating can have caused (loading a model, the gate's fixed prompts, a worker
    lost while it writes the version) counts against no rating, however often it happens."""
    rate_with_corrections(client, admin, RATED)
    if moment == "loading the model":
        _raise(monkeypatch, train, "load_base")
    elif moment == "the gate's fixed prompts":
        _raise(monkeypatch, gate, "greedy_answers")
    elif moment == "publishing, an error":
        _raise(monkeypatch, rounds, "write_checkpoint")
    else:
        _declare_lost_while_writing(monkeypatch, sessions)
    run_id = start(sessions, {"train": FAST, "gate": QUICK_GATE})
    assert run_round(sessions, settings, run_id) is RunStatus.failed
    assert set(_failures(sessions).values()) == {(0, False)}
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.data_ids is not None
        assert phase in (run.reason or "") and "counted against" not in (run.reason or "")
        assert run.batch_ids is None  # it was in no batch
    assert version_statuses(sessions) == {"v0": "active"} and set(_used(sessions)) == {None}


def test_an_admin_restores_a_rating_set_aside(
    client: TestClient, admin: dict[str, str], sessions: Any
) -> None:
    """GET /v1/set-aside lists the ratings set aside with the reason, and POST .../restore gives
    one back to the rounds (failures from zero); both are for admin keys only."""
    rate_with_corrections(client, admin, 2)
    one, two = (
        client.post(
            "/v1/generate", json={"prompt": "Pick one.", "max_new_tokens": 4, "seed": seed},
            headers=admin,
        ).json()["id"]
        for seed in (1, 2)
    )  # fmt: skip
    body = {"generation_a": one, "generation_b": two, "winner": "a"}
    comparison = client.post("/v1/comparisons", json=body, headers=admin).json()["id"]
    reason = "in 2 failed rounds (TRAINING_MAX_ROW_FAILURES), each failing in a batch that held it"
    with sessions() as session:
        feedback = sorted(session.scalars(select(Feedback.id)))
        for model, ids in ((Feedback, feedback[:1]), (Comparison, [comparison])):
            session.execute(
                update(model)
                .where(model.id.in_(ids))
                .values(failures=2, set_aside_at=utcnow(), set_aside_reason=reason)
            )
        session.execute(update(Feedback).where(Feedback.id == feedback[1]).values(failures=1))
        session.commit()
    restores = [f"/v1/feedback/{feedback[0]}/restore", f"/v1/comparisons/{comparison}/restore"]

    rater = client.post("/v1/keys", json={"name": "ann", "role": "rater"}, headers=admin)
    ann = {"Authorization": f"Bearer {rater.json()['key']}"}
    assert client.get("/v1/set-aside", headers=ann).status_code == 403
    for path in restores:
        assert client.post(path, headers=ann).status_code == 403
        assert client.post(path).status_code == 401

    listed = client.get("/v1/set-aside", headers=admin)
    assert listed.status_code == 200, listed.text
    assert [(r["kind"], r["id"], r["failures"], r["set_aside_reason"]) for r in listed.json()] == [
        ("feedback", feedback[0], 2, reason),
        ("comparison", comparison, 2, reason),
    ]
    for path, (kind, row_id) in zip(
        restores, [("feedback", feedback[0]), ("comparison", comparison)], strict=True
    ):
        restored = client.post(path, headers=admin)
        assert restored.status_code == 200, restored.text
        assert restored.json() == {
            "kind": kind, "id": row_id, "used_in_run_id": None, "failures": 0,
            "set_aside_at": None, "set_aside_reason": None,
        }  # fmt: skip
    # A rating charged but not set aside may be forgiven too; an unknown one is a 404.
    forgiven = client.post(f"/v1/feedback/{feedback[1]}/restore", headers=admin)
    assert forgiven.status_code == 200 and forgiven.json()["failures"] == 0
    assert client.post("/v1/comparisons/999999/restore", headers=admin).status_code == 404
    assert client.get("/v1/set-aside", headers=admin).json() == []
    with sessions() as session:
        rows = [*session.scalars(select(Feedback)), *session.scalars(select(Comparison))]
        assert {(r.failures, r.set_aside_at, r.set_aside_reason) for r in rows} == {(0, None, None)}
        unused = {row.feedback_id for row in kto_rows(session, unused_only=True)}
        assert unused == set(feedback)  # the rounds take it again
        assert [
            p.source_id for p in pair_rows(session, unused_only=True) if p.source == "comparison"
        ] == [comparison]


def test_a_live_rounds_directory_survives_another_rounds_clean_up(
    sessions: Any, settings: Settings
) -> None:
    """Clean-up removes leftovers of runs that are over, never a directory a live run wrote and
    has not recorded yet."""
    with sessions() as session:
        ensure_base_version(session, base_model=settings.model, path=settings.model)
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
            assert run is not None and fail_if_stale(session, run=run, stale_after=0)
        wait_until(heartbeat.lost.is_set, 10, "the heartbeat to notice", every=0.1)
        with pytest.raises(RoundLost):
            heartbeat.check()


def test_activation_is_compare_and_set(sessions: Any, settings: Settings) -> None:
    """Promotion from a version that is no longer active changes nothing and names the one that
    is; whatever a caller expects, the database never holds two active versions."""
    with sessions() as session:
        v0 = ensure_base_version(session, base_model=settings.model, path=settings.model)
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
        winner = promote(session, version=v2, expected_id=v0.id)  # a round that started from v0
        assert winner is not None and winner.name == "v1"
        session.commit()
        assert version_statuses(sessions) == {"v0": "retired", "v1": "active", "v2": "candidate"}

        with sessions() as other:  # another process rolls back to v0
            activate(other, other.get(ModelVersion, v0.id))
        # this session still believes v1 is active
        winner = promote(session, version=v2, expected_id=v1.id)
        assert winner is not None and winner.name == "v0"
        session.rollback()
        with pytest.raises(IntegrityError):  # a caller that skips the check meets the index
            promote(session, version=v2, expected_id=v2.id)
        session.rollback()
    assert version_statuses(sessions) == {"v0": "active", "v1": "retired", "v2": "candidate"}


def test_redis_visibility_timeout_outlasts_a_round(settings: Settings) -> None:
    """Celery's Redis visibility timeout is the setting, hours by default; the embedded broker
    (which never hands a task out twice) gets no such option."""
    from worker.celery_app import make_celery

    on_redis = settings.model_copy(update={"redis_url": REDIS_TEST_URL})
    options = make_celery(on_redis).conf.broker_transport_options
    assert options["visibility_timeout"] == settings.training_visibility_timeout
    assert Settings.model_fields["training_visibility_timeout"].default >= 2 * 3600
    assert make_celery(settings).conf.broker_transport_options == {}


def test_promotion_never_reports_success_with_nothing_active(
    sessions: Any, settings: Settings
) -> None:
    """When the version a promotion expected is no longer active and none is (another process
    refused it), the promotion does not report success while leaving nothing active: the new
    version becomes the active one, as a promotion that expected none would make it."""
    with sessions() as session:
        v0 = ensure_base_version(session, base_model=settings.model, path=settings.model)
        v1 = ModelVersion(
            name="v1", kind=VersionKind.base, base_model="other", path="p",
            status=VersionStatus.candidate, manifest={},
        )  # fmt: skip
        session.add(v1)
        session.commit()
        with sessions() as other:  # e.g. a process found v0's files altered
            refused = other.get(ModelVersion, v0.id)
            assert refused is not None
            refused.status = VersionStatus.refused
            other.commit()
        winner = promote(session, version=v1, expected_id=v0.id)  # a round that started from v0
        session.commit()
        assert winner is None
    assert version_statuses(sessions) == {"v0": "refused", "v1": "active"}


def test_a_queued_round_whose_task_was_lost_is_declared_stale(
    sessions: Any, settings: Settings
) -> None:
    """A round left queued (its task never reached a worker) no longer blocks every later round:
    once older than TRAINING_STALE_AFTER it is failed with the reason, a new round is queued,
    and its task turning up late does nothing."""
    with sessions() as session:
        ensure_base_version(session, base_model=settings.model, path=settings.model)
    lost = start(sessions)
    with sessions() as session:
        run, created = request_run(session, trigger="manual", stale_after=60)
        assert (run.id, created) == (lost, False)  # young: it may still be in the queue
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == lost)
            .values(created_at=utcnow() - timedelta(seconds=61))
        )
        session.commit()
        run, created = request_run(session, trigger="manual", stale_after=60)
        assert created and run.id != lost and run.status is RunStatus.queued
        old = session.get(TrainingRun, lost)
        assert old is not None and old.status is RunStatus.failed and old.live is None
        assert "no worker took it within 60 s" in (old.reason or ""), old.reason
    assert run_round(sessions, settings, lost) is RunStatus.failed  # redelivered late
    with sessions() as session:
        new = session.get(TrainingRun, run.id)
        assert new is not None and new.status is RunStatus.queued and new.live


# Every write of a run's status or reason is conditional, its row count checked


ANOTHER_WRITER = "changed by another process"


def _changed_by_another_writer_after(
    monkeypatch: pytest.MonkeyPatch, module: Any, run_id: int
) -> None:
    """Once `module`'s charge_failure has run (the run is failed, and the reason about to get
    its note), another writer changes the run's reason. (In the same transaction: on PostgreSQL a
    second one would wait on the row's lock; this stands for what the row count must catch.)"""
    charge = module.charge_failure

    def charge_then_change(session: Any, *args: Any, **kwargs: Any) -> str | None:
        note: str | None = charge(session, *args, **kwargs)
        session.execute(
            update(TrainingRun).where(TrainingRun.id == run_id).values(reason=ANOTHER_WRITER)
        )
        return note

    monkeypatch.setattr(module, "charge_failure", charge_then_change)


@pytest.mark.parametrize("who", ["the round itself", "a process declaring it lost"])
def test_a_failed_runs_reason_is_never_rewritten_over_another_writer(
    who: str,
    client: TestClient,
    admin: dict[str, str],
    sessions: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed round's reason gets the note of the ratings charged only while it is still the
    reason this process wrote: when another process changed the run in between, the row count
    says so, the change stays and a warning says what was not written."""
    from app.services import training

    rate_with_corrections(client, admin, 2)
    run_id = start(sessions)
    with sessions() as session:
        assert claim(session, run_id)
        feedback = sorted(session.scalars(select(Feedback.id)))
        batch = {"feedback": feedback, "comparisons": []}
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id)
            .values(batch_ids=batch, heartbeat_at=utcnow() - timedelta(seconds=60))
        )
        session.commit()
    with sessions() as session, caplog.at_level("WARNING"):
        if who == "the round itself":
            _changed_by_another_writer_after(monkeypatch, rounds, run_id)
            progress = rounds.Progress(phase="training", batch=batch)
            status = rounds._fail(session, settings, run_id, MemoryError("x"), progress)
            assert status is RunStatus.failed
        else:
            _changed_by_another_writer_after(monkeypatch, training, run_id)
            run = session.get(TrainingRun, run_id)
            assert run is not None and fail_if_stale(session, run=run, stale_after=1)
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and (run.status, run.reason) == (RunStatus.failed, ANOTHER_WRITER)
    assert f"training run {run_id} changed since it was failed" in caplog.text
    assert set(_failures(sessions).values()) == {(1, False)}  # charged: the failure stands


class _BrokerDown:
    """A task queue whose enqueue raises, after `meanwhile` ran (another process's doing)."""

    def __init__(self, meanwhile: Callable[[int], None] = lambda run_id: None) -> None:
        self.meanwhile = meanwhile

    def enqueue(self, task: str, *args: Any) -> str:
        self.meanwhile(int(args[0]))
        raise ConnectionError("broker unreachable")


def test_a_round_that_the_broker_refused_is_failed_unless_a_worker_took_it(
    sessions: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """start_run fails a round whose task the broker refused (its status was still queued); when
    a worker claimed it meanwhile (the task got through after all), the row count says so: the
    round keeps running, the caller gets it, and a warning says why it was not failed."""
    from app.services.errors import Unavailable
    from app.services.training import start_run

    with sessions() as session:
        ensure_base_version(session, base_model=settings.model, path=settings.model)
        with pytest.raises(Unavailable):
            down: Any = _BrokerDown()  # as a TaskQueue
            start_run(session, queue=down, requested_by_id=None, config={}, stale_after=60)
        refused = session.scalars(select(TrainingRun)).one()
        assert refused.status is RunStatus.failed and refused.live is None
        assert "could not reach the task broker" in (refused.reason or "")

    def a_worker_claims(run_id: int) -> None:
        with sessions() as other:
            assert claim(other, run_id)

    with sessions() as session, caplog.at_level("WARNING"):
        queue: Any = _BrokerDown(a_worker_claims)
        run, created = start_run(
            session, queue=queue, requested_by_id=None, config={}, stale_after=60
        )
        assert created and run.status is RunStatus.running and run.live
        assert run.reason is None and run.finished_at is None
    assert f"training run {run.id} is running, no longer queued: not failing it" in caplog.text


# A lost round removes only what it wrote itself


def test_a_lost_round_never_removes_the_directory_of_the_round_that_reused_its_name(
    client: TestClient,
    admin: dict[str, str],
    sessions: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round declared lost as it writes v1 goes on; the next round removes its directory (no
    row names it) and, the name being free, writes its own v1. The two directories differ (each
    is named after its round too), so the lost round, failing to publish, removes its own and
    can never reach the later round's."""
    from app.engine.checkpoints import read_manifest

    rate_with_corrections(client, admin, RATED)
    write = rounds.write_checkpoint
    later: list[Path] = []

    def write_then_lose_the_name(root: Path, directory: str, *args: Any, **kwargs: Any) -> Path:
        path = write(root, directory, *args, **kwargs)
        with sessions() as session:
            lost = session.scalars(select(TrainingRun).where(TrainingRun.live.is_(True))).one()
            # its heartbeat stopped as it wrote
            assert fail_if_stale(session, run=lost, stale_after=0)
            run, created = request_run(session, trigger="manual")
            assert created and claim(session, run.id)
            _remove_orphans(session, root, run.id)  # the later round's clean-up
        assert not path.exists()
        manifest = {"name": "v1", "training_run": run.id}
        later.append(write(root, version_directory("v1", run.id), weights, manifest))
        # The lost round's directory comes back (as if it wrote again after the clean-up):
        # what it removes on failing is that one, and only that one.
        write(root, directory, weights, {"name": "v1", "training_run": lost.id})
        return path

    def weights(directory: Path) -> None:
        (directory / "weights").write_text("the later round's")

    monkeypatch.setattr(rounds, "write_checkpoint", write_then_lose_the_name)
    first = start(sessions, {"train": FAST, "gate": QUICK_GATE})
    assert run_round(sessions, settings, first) is RunStatus.failed
    [reused] = later
    assert reused != settings.versions_dir / version_directory("v1", first)
    assert [p.name for p in settings.versions_dir.iterdir()] == [reused.name]
    assert read_manifest(reused)["training_run"] != first
    assert (reused / "weights").read_text() == "the later round's"
    assert version_statuses(sessions) == {"v0": "active"} and set(_used(sessions)) == {None}


# TRAINING_MAX_SECONDS: no round runs for ever


def test_a_round_past_its_time_limit_stops_and_publishes_nothing(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """A round still training after TRAINING_MAX_SECONDS (1 s here) stops at its next check,
    fails saying so, and publishes, marks and charges nothing."""
    settings = settings.model_copy(update={"training_max_seconds": 1.0})
    rate_with_corrections(client, admin, RATED)
    run_id = start(sessions, {"train": {**FAST, "epochs": 40}, "gate": QUICK_GATE})
    started = time.monotonic()
    assert run_round(sessions, settings, run_id) is RunStatus.failed
    assert time.monotonic() - started < 30, "the round went on past its time limit"
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.live is None and run.version_id is None
        reason = run.reason or ""
    assert "RoundTimedOut" in reason and "TRAINING_MAX_SECONDS" in reason, reason
    assert "counted against" not in reason  # slow, not stopped by any one batch
    assert version_statuses(sessions) == {"v0": "active"} and set(_used(sessions)) == {None}
    assert set(_failures(sessions).values()) == {(0, False)}
    leftovers = list(settings.versions_dir.iterdir()) if settings.versions_dir.exists() else []
    assert leftovers == []


def test_a_round_that_hangs_past_its_time_limit_stops_beating_and_is_declared_lost(
    client: TestClient,
    admin: dict[str, str],
    sessions: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that hangs in a batch but stays alive: its heartbeat thread beats until
    TRAINING_MAX_SECONDS, then stops, so the round goes stale and the next request for a round
    declares it lost (charging the batch it hung in) and queues a new one. Released, the hung
    round publishes nothing. (The clock jumps past the limit once it hangs.)"""
    settings = settings.model_copy(update={"training_max_seconds": 30.0})
    skew = [0.0]
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: time.monotonic() + skew[0])})
    monkeypatch.setattr(rounds, "time", clock)
    poisoned = rate_poisoned(client, admin)
    rate_with_corrections(client, admin, RATED - 1)
    stuck, release = threading.Event(), threading.Event()

    def hang() -> None:
        stuck.set()
        release.wait(120)

    poison(monkeypatch, two_pairs(settings), hang)
    run_id = start(sessions, PAIRS_OF_TWO)
    thread, result = _in_thread(lambda: run_round(sessions, two_pairs(settings), run_id))
    try:
        assert stuck.wait(180), "the round never reached the poisoned rating"
        time.sleep(3 * settings.training_stale_after)  # still beating: not stale
        with sessions() as session:
            assert request_run(session, trigger="manual", stale_after=2.0)[1] is False
        skew[0] = settings.training_max_seconds

        def declared_lost() -> bool:
            with sessions() as session:
                _, created = request_run(session, trigger="manual", stale_after=2.0)
                return created

        wait_until(declared_lost, 30, "the hung round to be declared lost", every=0.5)
    finally:
        release.set()
        thread.join(300)
    assert result == [RunStatus.failed]
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.status is RunStatus.failed and run.version_id is None
        assert "worker lost" in (run.reason or "") and run.batch_ids is not None
        assert poisoned in run.batch_ids["feedback"]
    assert version_statuses(sessions) == {"v0": "active"} and set(_used(sessions)) == {None}
