"""Rounds through a real Celery worker process, on Redis and on the embedded broker, while the
app keeps serving and follows the new version by itself."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.main import create_app
from app.models import Feedback, ModelVersion, TrainingRun
from app.services.queue import TaskQueue
from tests.helpers import (
    ADMIN_KEY,
    FAST,
    QUICK_GATE,
    REDIS_TEST_URL,
    IsolatedSettings,
    assert_versions_whole,
    queue_round,
    rate_with_corrections,
    reset_database,
    settings_environment,
    stop_process,
    wait_until,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DONE = re.compile(r"Task training\.run_round\[[^\]]+\] succeeded in [\d.]+s: '(\w+)'")
"""A worker's log line for a finished round task, with the status the task returned."""


@pytest.fixture(params=["redis", "embedded"])
def settings(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path: Path, small_suite: Path
) -> Settings:
    """Redis broker with PostgreSQL, or the embedded broker with SQLite: the two deployments."""
    if request.param == "redis":
        redis.Redis.from_url(REDIS_TEST_URL).flushdb()
        database_url: str = request.getfixturevalue("pg_url")
        reset_database(database_url)
    else:
        database_url = request.getfixturevalue("sqlite_url")
        reset_database(database_url)
    return IsolatedSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url=REDIS_TEST_URL if request.param == "redis" else None,
        model=str(tiny_model_dir),
        model_dtype="float32",
        admin_api_key=ADMIN_KEY,
        training_min_items=4,
        training_stale_after=3,
        evaluation_dir=small_suite,
        # With Redis, polling is effectively off: only a pub/sub announcement can make a swap.
        swap_poll_interval=1.0 if request.param == "embedded" else 3600.0,
    )


@pytest.fixture
def start_worker(
    settings: Settings, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start `celery worker` processes configured only through the environment."""
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
             "--loglevel", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle"],
            env=settings_environment(settings), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        processes.append(process)
        return process

    yield start
    for process in processes:
        stop_process(process)


def _final_run(client: TestClient, run_id: int, timeout: float = 240) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        run = client.get(f"/v1/training/runs/{run_id}", headers=ADMIN).json()
        return run if run["status"] not in ("queued", "running") else None

    result: dict[str, Any] = wait_until(final, timeout, f"run {run_id} to finish")
    return result


def test_round_on_a_worker_is_served_without_restart(
    settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """POST /v1/training/runs: a worker trains and publishes; the running app swaps to it."""
    start_worker()
    with TestClient(create_app(settings)) as client:
        rate_with_corrections(client, ADMIN, 10)
        response = client.post(
            "/v1/training/runs", json={"train": FAST, "gate": QUICK_GATE}, headers=ADMIN
        )
        assert response.status_code == 202, response.text
        again = client.post("/v1/training/runs", headers=ADMIN)
        assert again.status_code == 200 and again.json()["id"] == response.json()["id"]
        run = _final_run(client, response.json()["id"])
        assert run["status"] == "succeeded", run
        assert run["version"] == "v1"

        def served() -> bool:
            body = {"prompt": "Hi", "max_new_tokens": 2}
            answer = client.post("/v1/generate", json=body, headers=ADMIN).json()
            return bool(answer["model_version"] == "v1")

        # Redis announces it at once (the hourly poll cannot help); without Redis the 1 s poll
        # finds it. The bound is loose on purpose (a busy 2-core machine); bench/swap.py
        # measures the latency.
        wait_until(served, 30, "the app to serve v1")


# Redis only: two workers on one machine is a Redis deployment (`make run` starts one worker).
@pytest.mark.parametrize("settings", ["redis"], indirect=True)
def test_two_workers_handed_the_same_round_run_it_once(
    settings: Settings,
    start_worker: Callable[[], subprocess.Popen[bytes]],
    sessions: Any,
    tmp_path: Path,
) -> None:
    """The same round's task sent twice through the broker (a duplicated or redelivered message)
    while two worker processes wait: one runs the round, the other finds it taken and returns at
    once; one version, each rating used once, the run succeeded."""
    for _ in range(2):
        start_worker()
    logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    wait_until(lambda: all("ready." in log.read_text() for log in logs), 120, "two workers")
    with TestClient(create_app(settings)) as client:
        rate_with_corrections(client, ADMIN, 10)
        # Long enough that the second copy reaches the other worker while the first trains.
        slow = {"train": {**FAST, "batch_size": 2}, "gate": QUICK_GATE}
        run_id = queue_round(sessions, slow)
        tasks = TaskQueue(settings)
        for _ in range(2):
            tasks.enqueue("training.run_round", run_id)
        run = _final_run(client, run_id)
        assert run["status"] == "succeeded" and run["version"] == "v1", run

    def answers() -> list[list[str]] | None:
        found = [DONE.findall(log.read_text()) for log in logs]
        return found if sum(map(len, found)) == 2 else None

    per_worker = wait_until(answers, 60, "both copies of the task to finish")
    assert sorted(map(len, per_worker)) == [1, 1], per_worker  # one copy each
    assert sorted(answer for found in per_worker for answer in found) == ["running", "succeeded"]
    with sessions() as session:
        assert [v.name for v in session.scalars(select(ModelVersion))] == ["v0", "v1"]
        used = list(session.scalars(select(Feedback.used_in_run_id)))
        done = session.get(TrainingRun, run_id)
        assert done is not None and done.reason is None
    assert used.count(run_id) == done.counts["train_kto"] and set(used) == {run_id, None}
    assert_versions_whole(sessions, settings.versions_dir)


def test_worker_killed_mid_round_leaves_nothing_half_done(
    settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]], sessions: Any
) -> None:
    """SIGKILL during training: no new version, no used feedback; the lost round charges a
    failure only to the ratings of the micro-batch it died in (as it recorded them before the
    batch; none if it died between two), and the next round succeeds."""
    worker = start_worker()
    with TestClient(create_app(settings)) as client:
        rate_with_corrections(client, ADMIN, 10)
        slow = {"train": {**FAST, "epochs": 50, "batch_size": 2}, "gate": QUICK_GATE}
        run_id = client.post("/v1/training/runs", json=slow, headers=ADMIN).json()["id"]

        def training_started() -> bool:
            """The reward model is trained (its figures are on the run) and the adapter's
            steps have begun: the kill lands in one of the policy's micro-batches."""
            with sessions() as session:
                run = session.get(TrainingRun, run_id)
                return bool(
                    run
                    and "rm_train_loss" in (run.metrics or {})
                    and run.heartbeat_at
                    and run.heartbeat_at > run.started_at
                )

        wait_until(training_started, 120, "training steps")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)

        with sessions() as session:
            assert [v.name for v in session.scalars(select(ModelVersion))] == ["v0"]
            used = session.scalars(select(Feedback).where(Feedback.used_in_run_id.is_not(None)))
            assert used.all() == []
        versions_dir = settings.data_dir / "versions"
        leftovers = [p.name for p in versions_dir.iterdir()] if versions_dir.exists() else []
        assert all(name.startswith(".tmp-") for name in leftovers), leftovers
        models = client.get("/v1/models", headers=ADMIN).json()["data"]
        assert [(m["name"], m["status"], m["serving"]) for m in models] == [("v0", "active", True)]
        assert (
            client.post(
                "/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=ADMIN
            ).status_code
            == 200
        )

        # Once its heartbeat is stale the lost round is declared failed and a new one can run.
        start_worker()
        time.sleep(settings.training_stale_after + 1)
        response = client.post(
            "/v1/training/runs", json={"train": FAST, "gate": QUICK_GATE}, headers=ADMIN
        )
        assert response.status_code == 202, response.text
        lost = client.get(f"/v1/training/runs/{run_id}", headers=ADMIN).json()
        assert lost["status"] == "failed" and "worker lost" in lost["reason"]
        with sessions() as session:
            dead = session.get(TrainingRun, run_id)
            assert dead is not None
            batch = (dead.batch_ids or {}).get("feedback", [])
            charged = {f.id: f.failures for f in session.scalars(select(Feedback)) if f.failures}
        assert len(batch) <= 2 and charged == dict.fromkeys(batch, 1), (batch, charged)
        run = _final_run(client, response.json()["id"])
        assert run["status"] == "succeeded", run


def test_beat_starts_rounds_on_schedule(settings: Settings, tmp_path: Path, sessions: Any) -> None:
    """Beat with TRAINING_INTERVAL=2 queues rounds that a worker runs (skipped: no ratings yet)."""
    env = {**settings_environment(settings), "TRAINING_INTERVAL": "2"}
    common = ["--loglevel", "INFO"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", *command, *common],
            env=env,
            stdout=(tmp_path / f"{command[0]}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for command in (
            ["worker", "--pool", "solo", "--without-heartbeat", "--without-gossip"],
            ["beat", "--schedule", str(tmp_path / "beat-schedule")],
        )
    ]
    with TestClient(create_app(settings)):  # migrated database, base version registered
        pass
    try:

        def scheduled_runs() -> list[TrainingRun]:
            with sessions() as session:
                query = select(TrainingRun).where(TrainingRun.trigger == "schedule")
                return [run for run in session.scalars(query) if run.status.value == "skipped"]

        runs = wait_until(scheduled_runs, 90, "a scheduled round")
        assert "minimum is 4" in (runs[0].reason or "")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)
