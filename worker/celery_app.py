"""The Celery app: Redis when REDIS_URL is set, else an embedded broker that needs no server."""

from __future__ import annotations

from celery import Celery

from app.config import Settings, load_settings


def broker_urls(settings: Settings) -> tuple[str, str]:
    """(broker, result backend) for these settings."""
    if settings.redis_url:
        return settings.redis_url, settings.redis_url
    # kombu's SQLAlchemy transport and Celery's database backend: files in the data directory.
    data_dir = settings.data_dir.resolve()
    return f"sqla+sqlite:///{data_dir / 'broker.db'}", f"db+sqlite:///{data_dir / 'results.db'}"


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for these settings."""
    broker, backend = broker_urls(settings)
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
        result_expires=7 * 24 * 3600,
    )
    return app


celery_app = make_celery(load_settings())
