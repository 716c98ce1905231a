"""Thin, named Celery tasks; each calls a plain function."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

from worker.celery_app import celery_app


@celery_app.task(name="worker.ping")
def ping() -> dict[str, str]:
    """Answer with this worker's host and time: proves a task made the round trip via the broker."""
    return {"worker": socket.gethostname(), "at": datetime.now(UTC).isoformat()}
