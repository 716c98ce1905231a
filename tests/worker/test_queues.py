"""Rounds travel on a queue of their own, so that a worker on another host can take them alone."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from app.config import Settings
from app.services.queue import TRAINING_QUEUE, TaskQueue
from tests.helpers import REDIS_TEST_URL, IsolatedSettings, stop_process
from worker.celery_app import make_celery

DEFAULT_QUEUE = "celery"


@pytest.fixture(params=["embedded", "redis"])
def broker_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The embedded broker (files in the data dir) or the Redis on this machine, emptied."""
    if request.param == "redis":
        redis.Redis.from_url(REDIS_TEST_URL).flushdb()
        return IsolatedSettings(data_dir=tmp_path, redis_url=REDIS_TEST_URL)
    return IsolatedSettings(data_dir=tmp_path)


def waiting(celery: Celery, queue: str) -> int:
    """Messages waiting in a queue of the broker."""
    with celery.connection_for_read() as connection:
        return int(connection.default_channel.queue_declare(queue=queue, passive=True)[1])


def test_rounds_are_sent_to_the_training_queue_and_the_rest_to_the_default(
    broker_settings: Settings,
) -> None:
    """What the API sends by name: `training.*` tasks wait in the training queue, others in
    Celery's default queue, on either broker."""
    queue = TaskQueue(broker_settings)
    queue.enqueue("training.run_round", 1)
    queue.enqueue("training.run_round", 2)
    queue.enqueue("worker.ping")
    celery = make_celery(broker_settings)
    assert waiting(celery, TRAINING_QUEUE) == 2
    assert waiting(celery, DEFAULT_QUEUE) == 1


@pytest.fixture
def default_queue_worker(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker on Redis that consumes the default queue alone (`-Q celery`), as a CPU
    worker beside a GPU one would."""
    redis.Redis.from_url(REDIS_TEST_URL).flushdb()
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
        "DATA_DIR": str(tmp_path), "REDIS_URL": REDIS_TEST_URL,
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
         "-Q", DEFAULT_QUEUE, "--without-heartbeat", "--without-gossip", "--without-mingle"],
        env=env, cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    yield process
    stop_process(process)


def test_a_worker_on_the_default_queue_leaves_rounds_to_the_training_workers(
    tmp_path: Path, default_queue_worker: subprocess.Popen[bytes]
) -> None:
    """With a worker consuming only the default queue, a ping makes the round trip while a
    round stays queued for a worker that consumes the training queue."""
    settings = IsolatedSettings(data_dir=tmp_path, redis_url=REDIS_TEST_URL)
    TaskQueue(settings).enqueue("training.run_round", 7)
    celery = make_celery(settings)
    answer = celery.send_task("worker.ping").get(timeout=60)
    assert answer["worker"]
    assert default_queue_worker.poll() is None
    assert waiting(celery, TRAINING_QUEUE) == 1


def test_a_worker_started_without_q_consumes_both_queues(tmp_path: Path) -> None:
    """`make run` and docker-compose.yml start the worker without `-Q`: it takes rounds and
    everything else."""
    celery = make_celery(IsolatedSettings(data_dir=tmp_path))
    assert set(celery.amqp.queues) == {DEFAULT_QUEUE, TRAINING_QUEUE}
