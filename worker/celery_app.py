"""The Celery app: Redis when REDIS_URL is set, else an embedded broker that needs no server."""

from __future__ import annotations

from functools import cache

from celery import Celery
from celery.signals import beat_init, worker_init
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, load_settings
from app.db import make_engine, make_sessionmaker
from app.services.queue import declare_queues, route_tasks


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for these settings, with the training schedule for beat."""
    broker, backend = settings.celery_urls
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("feedback_lm", broker=broker, backend=backend, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,  # a worker killed mid-task leaves the task to be run again
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # rounds are long; never hoard them
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        broker_connection_retry_on_startup=True,
        # Redis hands a task nobody acknowledged to another worker after this long: past the
        # longest round, so a round still running is not handed out again (a copy that is finds
        # the run taken and exits, but would hold a worker meanwhile). The embedded broker never
        # hands one out twice, and passes these options to create_engine, which refuses them.
        broker_transport_options=(
            {"visibility_timeout": settings.training_visibility_timeout}
            if settings.redis_url
            else {}
        ),
        result_expires=7 * 24 * 3600,
        beat_schedule={
            "training-round": {
                "task": "training.scheduled_round",
                "schedule": settings.training_interval,
            }
        },
    )
    route_tasks(app)
    return app


settings = load_settings()
celery_app = make_celery(settings)


@worker_init.connect
@beat_init.connect
def _declare_queues(sender: object, **_: object) -> None:
    """Create the queues before consuming or sending (see `declare_queues` for the race)."""
    declare_queues(celery_app)


@cache
def sessions() -> sessionmaker[Session]:
    """This worker process's session factory (made on first use, after the fork)."""
    return make_sessionmaker(make_engine(settings.sqlalchemy_url))
