"""Thin, named Celery tasks; each calls a plain function with ids, never payloads."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

from app.services.training import request_run
from worker.celery_app import celery_app, sessions, settings


@celery_app.task(name="worker.ping")
def ping() -> dict[str, str]:
    """Answer with this worker's host and time: proves a task made the round trip via the broker."""
    return {"worker": socket.gethostname(), "at": datetime.now(UTC).isoformat()}


@celery_app.task(name="training.run_round")
def run_round(run_id: int) -> str:
    """Run one queued training round (a redelivered or duplicated copy finds it taken and exits)."""
    from worker.training.rounds import run_round as run  # torch, TRL: only in the worker

    return run(sessions(), settings, run_id).value


@celery_app.task(name="training.scheduled_round")
def scheduled_round() -> dict[str, object]:
    """Beat's round: queue one unless one is live, and run it here."""
    with sessions()() as session:
        run, created = request_run(
            session, trigger="schedule", stale_after=settings.training_stale_after,
            max_row_failures=settings.training_max_row_failures,
        )  # fmt: skip
    if not created:
        return {"run": run.id, "status": run.status.value, "note": "a round is already live"}
    return {"run": run.id, "status": run_round(run.id)}
