"""Training runs as the API and CLI see them: start one (one at a time), list, read."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import RunStatus, TrainingRun
from app.services.errors import NotFound, Unavailable
from app.services.queue import TaskQueue
from app.services.versions import active_version


def live_run(session: Session) -> TrainingRun | None:
    """The queued or running round, if any."""
    return session.scalar(select(TrainingRun).where(TrainingRun.live.is_(True)))


def fail_if_stale(session: Session, run: TrainingRun, stale_after: float) -> bool:
    """Mark a running round whose worker stopped beating as failed; True when it was."""
    if run.status is not RunStatus.running:
        return False
    last = run.heartbeat_at or run.started_at or run.created_at
    if utcnow() - last < timedelta(seconds=stale_after):
        return False
    finish(run, RunStatus.failed, f"worker lost: no heartbeat since {last.isoformat()}")
    session.commit()
    return True


def finish(run: TrainingRun, status: RunStatus, reason: str | None = None) -> None:
    """Put a run in a final state (the caller commits)."""
    run.status = status
    run.live = None
    run.reason = reason
    run.finished_at = utcnow()


def request_run(
    session: Session,
    *,
    trigger: str,
    requested_by_id: int | None = None,
    config: dict[str, Any] | None = None,
    stale_after: float = 600,
) -> tuple[TrainingRun, bool]:
    """Queue a round unless one is live; return (run, created). The live one is returned instead."""
    for _ in range(2):
        current = live_run(session)
        if current is not None and not fail_if_stale(session, current, stale_after):
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
    queue: TaskQueue,
    *,
    requested_by_id: int | None,
    config: dict[str, Any],
    stale_after: float,
) -> tuple[TrainingRun, bool]:
    """Queue a round and hand it to a worker; the live round instead when there is one."""
    run, created = request_run(
        session, trigger="manual", requested_by_id=requested_by_id, config=config,
        stale_after=stale_after,
    )  # fmt: skip
    if created:
        try:
            queue.enqueue("training.run_round", run.id)
        except Exception as exc:  # broker down: do not leave a live round nobody will run
            finish(run, RunStatus.failed, f"could not reach the task broker: {exc}")
            session.commit()
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
