"""A real Celery worker process consumes tasks from Redis and from the embedded broker."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.config import Settings
from tests.helpers import REDIS_TEST_URL, IsolatedSettings, settings_environment
from worker.celery_app import make_celery


@pytest.fixture(params=["embedded", "redis"])
def worker_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for the embedded broker (files in the data dir) or the Redis on this machine."""
    if request.param == "redis":
        redis.Redis.from_url(REDIS_TEST_URL).flushdb()
        return IsolatedSettings(data_dir=tmp_path, redis_url=REDIS_TEST_URL)
    return IsolatedSettings(data_dir=tmp_path)


@pytest.fixture
def running_worker(worker_settings: Settings) -> Iterator[subprocess.Popen[str]]:
    """`celery worker` as a separate process, configured only through the environment."""
    env = settings_environment(worker_settings)  # the test's settings, none of the caller's
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
         "--loglevel", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    yield process
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def test_broker_choice_follows_settings(tmp_path: Path) -> None:
    """REDIS_URL set: Redis for broker and results; unset: SQLite files in the data directory."""
    redis_settings = IsolatedSettings(data_dir=tmp_path, redis_url="redis://h:6379/0")
    assert redis_settings.celery_urls == ("redis://h:6379/0", "redis://h:6379/0")
    broker, backend = IsolatedSettings(data_dir=tmp_path).celery_urls
    assert broker == f"sqla+sqlite:///{tmp_path.resolve() / 'broker.db'}"
    assert backend == f"db+sqlite:///{tmp_path.resolve() / 'results.db'}"


def test_a_task_makes_the_round_trip(
    worker_settings: Settings, running_worker: subprocess.Popen[str]
) -> None:
    """A task sent by name is run by the worker process and its result comes back."""
    app = make_celery(worker_settings)
    result = app.send_task("worker.ping")
    answer = result.get(timeout=60)
    assert running_worker.poll() is None
    assert set(answer) == {"worker", "at"}
    assert answer["worker"]


def test_processes_starting_together_all_get_the_embedded_queue(tmp_path: Path) -> None:
    """Six processes creating the embedded broker's tables and queue at once: none fails.

    Without `declare_queues` one of them loses the race for CREATE TABLE or the queue's INSERT,
    which is how a worker started beside the API used to exit with "Unrecoverable error".
    """
    script = (
        "import sys; from celery import Celery; from app.services.queue import declare_queues; "
        "declare_queues(Celery(broker=sys.argv[1]))"
    )
    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    processes = [
        subprocess.Popen([sys.executable, "-c", script, broker], stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, "\n".join(errors)
