"""Training runs as the API and CLI see them: start one (one at a time), list, read; and every
change of a run's status, each a compare-and-set on the status it expects."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from app.db import utcnow
from app.models import Comparison, Feedback, RunStatus, TrainingRun
from app.services.errors import NotFound, Unavailable
from app.services.queue import TaskQueue
from app.services.versions import active_version

log = logging.getLogger(__name__)


def live_run(session: Session) -> TrainingRun | None:
    """The queued or running round, if any."""
    return session.scalar(select(TrainingRun).where(TrainingRun.live.is_(True)))


def transition(
    session: Session,
    *,
    run_id: int,
    expected: RunStatus,
    when: Sequence[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Set `values` on the run only while its status is `expected` (and each of `when` holds);
    True when it was, False when the row count says another process changed the run first (the
    caller commits). Every write of a run's status or reason goes through here. The in-memory
    run, if loaded, reloads on next access."""
    result = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == expected, *when)
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    run = session.identity_map.get(identity_key(TrainingRun, run_id))
    if run is not None:
        session.expire(run)
    return cast(CursorResult[Any], result).rowcount == 1


def finish(
    session: Session,
    *,
    run_id: int,
    expected: RunStatus,
    status: RunStatus,
    reason: str | None = None,
    when: Sequence[ColumnElement[bool]] = (),
) -> bool:
    """Move a run from `expected` to a final state; True when it was still `expected` (the
    caller commits)."""
    return transition(
        session, run_id=run_id, expected=expected, when=when,
        status=status, reason=reason, finished_at=utcnow(), live=None,
    )  # fmt: skip


def add_to_reason(
    session: Session, *, run_id: int, status: RunStatus, reason: str, note: str
) -> bool:
    """Append `note` to the reason of a run this process just finished as `status` with `reason`,
    only while it still is exactly that (the caller commits); when another process changed the
    run meanwhile, log it and leave what that process wrote."""
    if transition(
        session, run_id=run_id, expected=status, when=[TrainingRun.reason == reason],
        reason=f"{reason}; {note}",
    ):  # fmt: skip
        return True
    log.warning(
        "training run %s changed since it was %s (%s): not adding %r to its reason",
        run_id, status.value, reason, note,
    )  # fmt: skip
    return False


def claim(session: Session, run_id: int) -> bool:
    """Take a queued run for this worker (commits); False when another copy of the task took it
    or it is no longer queued."""
    now = utcnow()
    claimed = transition(
        session, run_id=run_id, expected=RunStatus.queued,
        status=RunStatus.running, started_at=now, heartbeat_at=now,
    )  # fmt: skip
    session.commit()
    return claimed


def fail_if_stale(
    session: Session, *, run: TrainingRun, stale_after: float, max_row_failures: int = 2
) -> bool:
    """Declare lost (commits) a running round whose worker stopped beating, charging the
    ratings of the batch it was computing on, if any (`charge_failure`), or a round still queued
    `stale_after` seconds after it was queued (its task was lost, or no worker is consuming);
    True when this call did."""
    if run.status is RunStatus.queued:
        return _fail_if_never_taken(session, run=run, stale_after=stale_after)
    if run.status is not RunStatus.running:
        return False
    last = run.heartbeat_at or run.started_at or run.created_at
    cutoff = utcnow() - timedelta(seconds=stale_after)
    if last >= cutoff:
        return False
    reason = f"worker lost: no heartbeat since {last.isoformat()}"
    # Conditional on staleness too: a beat that landed since the read keeps the round alive.
    stale = or_(TrainingRun.heartbeat_at.is_(None), TrainingRun.heartbeat_at < cutoff)
    if not finish(
        session, run_id=run.id, expected=RunStatus.running, status=RunStatus.failed,
        reason=reason, when=[stale],
    ):  # fmt: skip
        session.rollback()
        session.refresh(run)
        return False
    # Read after the update, which holds the row: the batch as the round last recorded it.
    batch = session.scalar(select(TrainingRun.batch_ids).where(TrainingRun.id == run.id))
    note = charge_failure(session, run_id=run.id, batch=batch, limit=max_row_failures)
    if note:
        add_to_reason(session, run_id=run.id, status=RunStatus.failed, reason=reason, note=note)
    session.commit()
    session.refresh(run)
    return True


def _fail_if_never_taken(session: Session, *, run: TrainingRun, stale_after: float) -> bool:
    """Fail a queued round no worker claimed within `stale_after` seconds (commits). Its task, if
    it still turns up, finds the run no longer queued and exits; the round took no ratings."""
    cutoff = utcnow() - timedelta(seconds=stale_after)
    if run.created_at >= cutoff:
        return False
    reason = (
        f"never started: no worker took it within {stale_after:g} s of "
        f"{run.created_at.isoformat()} (TRAINING_STALE_AFTER); its task was lost or no worker "
        "is running"
    )
    # Conditional on the status: a worker that claims it at this moment keeps it.
    old = [TrainingRun.created_at < cutoff]
    failed = finish(
        session, run_id=run.id, expected=RunStatus.queued, status=RunStatus.failed,
        reason=reason, when=old,
    )  # fmt: skip
    session.commit()
    session.refresh(run)
    return failed


def charge_failure(
    session: Session, *, run_id: int, batch: dict[str, list[int]] | None, limit: int
) -> str | None:
    """Count a failed round against the ratings of the batch it was computing on (`batch`, as
    `TrainingRun.batch_ids`; None: it failed outside any batch, and nothing is charged), and set
    aside those that reach `limit` (the caller commits). Returns what to add to the run's
    reason: which ratings were charged, and which set aside."""
    charged, aside = [], []
    for kind, model in (("feedback", Feedback), ("comparisons", Comparison)):
        ids = (batch or {}).get(kind) or []
        if not ids:
            continue
        # Only ratings still in play: not used by a round since, nor set aside already.
        fresh = [model.id.in_(ids), model.used_in_run_id.is_(None), model.set_aside_at.is_(None)]
        hit = sorted(session.scalars(select(model.id).where(*fresh)))
        if not hit:
            continue
        session.execute(
            update(model).where(*fresh).values(failures=model.failures + 1),
            execution_options={"synchronize_session": False},
        )
        charged.append(f"{kind} {', '.join(map(str, hit))}")
        reached = list(session.scalars(select(model.id).where(*fresh, model.failures >= limit)))
        if reached:
            session.execute(
                update(model)
                .where(model.id.in_(reached))
                .values(
                    set_aside_at=utcnow(),
                    set_aside_reason=f"in {limit} failed rounds (TRAINING_MAX_ROW_FAILURES), "
                    f"each failing in a batch that held it; the last run {run_id}",
                ),
                execution_options={"synchronize_session": False},
            )
            aside.append(f"{kind} {', '.join(map(str, sorted(reached)))}")
    if not charged:
        return None
    note = f"a failure counted against the ratings of the batch it was in: {'; '.join(charged)}"
    if aside:
        note += (
            f"; set aside the ratings in {limit} failed rounds (TRAINING_MAX_ROW_FAILURES), which "
            f"no round takes any more until an admin restores them: {'; '.join(aside)}"
        )
    return note


def request_run(
    session: Session,
    *,
    trigger: str,
    requested_by_id: int | None = None,
    config: dict[str, Any] | None = None,
    stale_after: float = 600,
    max_row_failures: int = 2,
) -> tuple[TrainingRun, bool]:
    """Queue a round unless one is live; return (run, created). The live one is returned instead."""
    for _ in range(2):
        current = live_run(session)
        if current is not None and not fail_if_stale(
            session, run=current, stale_after=stale_after, max_row_failures=max_row_failures
        ):
            return current, False
        active = active_version(session)
        run = TrainingRun(
            status=RunStatus.queued,
            live=True,
            trigger=trigger,
            requested_by_id=requested_by_id,
            parent_version_id=active.id if active else None,
            config=config or {},
        )
        session.add(run)
        try:
            session.commit()
        except IntegrityError:  # another process queued one at the same moment
            session.rollback()
            continue
        return run, True
    current = live_run(session)
    if current is None:
        raise RuntimeError("could not queue a training round")
    return current, False


def start_run(
    session: Session,
    *,
    queue: TaskQueue,
    requested_by_id: int | None,
    config: dict[str, Any],
    stale_after: float,
    max_row_failures: int = 2,
) -> tuple[TrainingRun, bool]:
    """Queue a round and hand it to a worker; the live round instead when there is one."""
    run, created = request_run(
        session, trigger="manual", requested_by_id=requested_by_id, config=config,
        stale_after=stale_after, max_row_failures=max_row_failures,
    )  # fmt: skip
    if created:
        try:
            queue.enqueue("training.run_round", run.id)
        except Exception as exc:  # broker down: do not leave a live round nobody will run
            reason = f"could not reach the task broker: {exc}"
            failed = finish(
                session, run_id=run.id, expected=RunStatus.queued, status=RunStatus.failed,
                reason=reason,
            )  # fmt: skip
            session.commit()
            session.refresh(run)
            if not failed:
                # Someone else moved it first: a worker claimed it (the task got through after
                # all), or it was declared stale. Theirs stands; a round a worker took is
                # answered as queued would be.
                log.warning(
                    "training run %s is %s, no longer queued: not failing it (%s)",
                    run.id, run.status.value, reason,
                )  # fmt: skip
                if run.status is not RunStatus.failed:
                    return run, created
            raise Unavailable("the task broker is unavailable; try again shortly") from None
    return run, created


def list_runs(session: Session, limit: int = 50) -> list[TrainingRun]:
    """Runs newest first."""
    return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))


def get_run(session: Session, run_id: int) -> TrainingRun:
    """One run by id."""
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise NotFound(f"training run {run_id} does not exist")
    return run
