"""Sending tasks to the workers by name: the API never imports worker code."""

from __future__ import annotations

from celery import Celery

from app.config import Settings


class TaskQueue:
    """A Celery client on the same broker as the workers."""

    def __init__(self, settings: Settings) -> None:
        broker, backend = settings.celery_urls
        self._celery = Celery("feedback_lm", broker=broker, backend=backend)
        self._celery.conf.broker_connection_timeout = 3
        self._celery.conf.broker_connection_max_retries = 1

    def enqueue(self, task: str, *args: object) -> str:
        """Queue a task by name; returns its id. Raises when the broker cannot be reached."""
        return str(self._celery.send_task(task, args=list(args)).id)
