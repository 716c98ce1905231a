"""Sending tasks to the workers by name: the API never imports worker code."""

from __future__ import annotations

import time

from celery import Celery
from kombu import Queue
from sqlalchemy.exc import IntegrityError, OperationalError

from app.config import Settings

TRAINING_QUEUE = "training"
"""The queue rounds (tasks named `training.*`) are sent to; everything else goes to Celery's
default queue. A worker started without `-Q` consumes both; one on a GPU host can take the
rounds alone (`celery -A worker.celery_app worker -Q training`), see docs/operations.md."""


def route_tasks(celery: Celery) -> None:
    """Declare the default and the training queue on this app, and route rounds to the latter."""
    celery.conf.task_queues = (Queue(celery.conf.task_default_queue), Queue(TRAINING_QUEUE))
    celery.conf.task_routes = {"training.*": {"queue": TRAINING_QUEUE}}


def declare_queues(celery: Celery, attempts: int = 5) -> None:
    """Create the app's queues on the broker now, tolerating another process doing the same.

    kombu's SQLAlchemy transport (the embedded broker) creates its tables and then a queue row
    with plain CREATE and INSERT statements the first time a process uses it; a worker and an
    API process starting together can both try, and the loser fails ("table ... already exists",
    or IntegrityError): a worker then exits with "Unrecoverable error". Once they exist, every
    later use only reads them. On Redis this is a cheap no-op.
    """
    for attempt in range(attempts):
        try:
            with celery.connection_for_write() as connection:
                for queue in celery.conf.task_queues or [Queue(celery.conf.task_default_queue)]:
                    queue(connection.default_channel).declare()
            return
        except (IntegrityError, OperationalError):  # SQLAlchemy's, raised by the transport
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


class TaskQueue:
    """A Celery client on the same broker as the workers."""

    def __init__(self, settings: Settings) -> None:
        broker, backend = settings.celery_urls
        self._celery = Celery("feedback_lm", broker=broker, backend=backend)
        self._celery.conf.broker_connection_timeout = 3
        self._celery.conf.broker_connection_max_retries = 1
        route_tasks(self._celery)
        self._declared = False

    def enqueue(self, task: str, *args: object) -> str:
        """Queue a task by name; returns its id. Raises when the broker cannot be reached."""
        if not self._declared:
            declare_queues(self._celery)
            self._declared = True
        return str(self._celery.send_task(task, args=list(args)).id)
