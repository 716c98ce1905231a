"""Faults of a real deployment, each on real servers: Redis stopped, PostgreSQL restarted, the API
process killed, the worker killed in the gate, the disk full. Generation and ratings keep being
accepted where they can be, outages answer 503 with Retry-After (never 500), the service recovers
by itself, nothing acknowledged is lost and no version is ever half written.

The worker killed while training is in tests/worker/test_worker_rounds.py; a corrupt or missing
version in tests/training/test_training.py.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.config import Settings
from app.migrate import upgrade
from app.models import Comparison, Feedback, Generation, ModelVersion, RunStatus, TrainingRun
from app.state import app_state
from tests.helpers import (
    ADMIN_KEY,
    FAST,
    QUICK_GATE,
    api_ready,
    assert_versions_whole,
    free_port,
    queue_round,
    reset_database,
    settings_environment,
    stop_process,
    version_statuses,
    wait_until,
)
from worker.training import rounds
from worker.training.rounds import run_round

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PG_BIN = next(
    (p.parent for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)),
    Path(shutil.which("initdb") or "/nonexistent").parent,
)
needs_initdb = pytest.mark.skipif(
    not (PG_BIN / "initdb").is_file(),
    reason="PostgreSQL's initdb is not installed (looked in /usr/lib/postgresql/*/bin and PATH)",
)


def _worker(settings: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A Celery worker process on the settings' broker and database (`env`: more settings)."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
         "--loglevel", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        env={**settings_environment(settings), **env}, stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def _rate_corrected(client: httpx.Client, count: int) -> list[int]:
    """`count` generations, each rated down with a correction; the ids of the ratings."""
    ids = []
    for i in range(count):
        body = {"prompt": f"Question number {i}?", "max_new_tokens": 4, "seed": i}
        generation = client.post("/v1/generate", json=body)
        assert generation.status_code == 200, generation.text
        rating = {"generation_id": generation.json()["id"], "thumbs": "down", "correction": "Yes."}
        response = client.post("/v1/feedback", json=rating)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


# --- Redis stopped -----------------------------------------------------------------------------


class OnSharedPostgres:
    """Test classes on the shared PostgreSQL (a fresh database each test), not the default."""

    @pytest.fixture
    def db_url(self, pg_url: str) -> str:
        """The shared PostgreSQL, emptied."""
        reset_database(pg_url)
        return pg_url


class RedisServer:
    """A private redis-server on its own port (the machine's shared one is never touched)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (empty: nothing is saved) and wait until it answers."""
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, 20, "redis-server to answer")

    def stop(self) -> None:
        """Stop it."""
        if self.process is not None:
            stop_process(self.process)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis, started."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis.log")
    server.start()
    yield server
    server.stop()


class TestRedisStopped(OnSharedPostgres):
    """PostgreSQL and a private Redis (broker, rate limits, version announcements)."""

    @pytest.fixture
    def settings(self, settings: Settings, redis_server: RedisServer) -> Settings:
        """Redis for everything; few ratings make a round."""
        return settings.model_copy(update={"redis_url": redis_server.url, "training_min_items": 4})

    def test_ratings_are_accepted_and_rounds_resume(
        self,
        settings: Settings,
        live: str,
        redis_server: RedisServer,
        sessions: Any,
        tmp_path: Path,
    ) -> None:
        """Without Redis: generation and ratings 2xx, a round 503; with it back, a round runs."""
        worker = _worker(settings, tmp_path / "worker.log")
        try:
            with httpx.Client(base_url=live, headers=ADMIN, timeout=60) as client:
                _rate_corrected(client, 1)
                redis_server.stop()

                rated = _rate_corrected(client, 5)
                with sessions() as session:
                    stored = session.scalars(select(Feedback.id).where(Feedback.id.in_(rated)))
                    assert sorted(stored) == sorted(rated)
                refused = client.post("/v1/training/runs", json={"train": FAST})
                assert refused.status_code == 503, refused.text
                assert refused.headers["Retry-After"].isdigit()
                assert "broker is unavailable" in refused.json()["detail"]
                # Not left queued for a worker that will never get it: the next request can run.
                runs = client.get("/v1/training/runs").json()
                assert [(r["status"], r["reason"][:30]) for r in runs] == [
                    ("failed", "could not reach the task broke")
                ]

                redis_server.start()  # same port, empty
                body = {"train": FAST, "gate": QUICK_GATE}
                started = client.post("/v1/training/runs", json=body)
                assert started.status_code == 202, started.text

                def finished() -> dict[str, Any] | None:
                    run = client.get(f"/v1/training/runs/{started.json()['id']}").json()
                    return run if run["status"] not in ("queued", "running") else None

                run = wait_until(finished, 240, "the worker to run the round")
                assert run["status"] in ("succeeded", "rejected"), run
            # It trained on the ratings taken while Redis was down.
            with sessions() as session:
                used = session.scalars(
                    select(Feedback.id).where(Feedback.used_in_run_id == run["id"])
                )
                assert set(rated) & set(used), run  # (the newest are held out for the gate)
        finally:
            stop_process(worker)


class TestRedisStoppedDuringASwap(OnSharedPostgres):
    """Two API apps on PostgreSQL and a private Redis; a round publishes while Redis is down."""

    @pytest.fixture
    def settings(self, settings: Settings, redis_server: RedisServer) -> Settings:
        """Redis for everything; limits high enough for the posting thread, but counted in Redis
        while it is up."""
        unlimited = "100000/minute"
        return settings.model_copy(
            update={
                "redis_url": redis_server.url,
                "training_min_items": 4,
                "swap_poll_interval": 0.5,
                "rate_limit_generation": unlimited,
                "rate_limit_feedback": unlimited,
            }
        )

    def test_polling_takes_over_and_the_api_keeps_answering(
        self,
        settings: Settings,
        live: str,
        client: TestClient,
        redis_server: RedisServer,
        sessions: Any,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Its announcement lost, both apps still swap to the new version by polling, and every
        request before, during and after the swap is a 2xx."""
        client.headers.update(ADMIN)
        _rate_corrected(client, 8)
        run_id = queue_round(sessions, {"train": FAST, "gate": QUICK_GATE})
        outcome: list[RunStatus] = []
        training = threading.Thread(
            target=lambda: outcome.append(run_round(sessions, settings, run_id))
        )
        training.start()
        poster = Poster(live, 0)
        thread = threading.Thread(target=poster.run)

        def chose_its_data() -> bool:  # (the poster's random ratings stay out of the round)
            with sessions() as session:
                run = session.get(TrainingRun, run_id)
                return bool(run and run.counts)

        try:
            wait_until(chose_its_data, 60, "the round to choose its ratings", every=0.1)
            thread.start()
            wait_until(lambda: len(poster.ratings) >= 2, 60, "the first ratings", every=0.1)
            redis_server.stop()  # while the round trains
            training.join(240)
            assert outcome == [RunStatus.succeeded]
            assert "could not announce version" in caplog.text  # it published without Redis
            assert version_statuses(sessions) == {"v0": "retired", "v1": "active"}

            def serve_v1() -> bool:
                body = {"prompt": "Hi", "max_new_tokens": 2}
                answers = [
                    httpx.post(f"{live}/v1/generate", json=body, headers=ADMIN, timeout=30),
                    client.post("/v1/generate", json=body),
                ]
                assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
                return all(a.json()["model_version"] == "v1" for a in answers)

            wait_until(serve_v1, 30, "both apps to serve v1 by polling")
            rated = len(poster.ratings)
            wait_until(lambda: len(poster.ratings) >= rated + 4, 60, "ratings after the swap")
        finally:
            poster.stop.set()
            training.join(240)
            if thread.is_alive():
                thread.join(60)
            redis_server.start()  # the fixture stops it at the end
        assert not thread.is_alive()
        assert poster.failures == 0 and poster.refusals == [], poster.refusals[:5]
        assert poster.generations and poster.ratings
        with sessions() as session:
            stored = set(session.scalars(select(Feedback.generation_id)))
            assert set(poster.ratings) <= stored
            names = {v.id: v.name for v in session.scalars(select(ModelVersion))}
            posted = select(Generation).where(Generation.id.in_(poster.generations))
            served = {names[g.model_version_id] for g in session.scalars(posted)}
        assert served == {"v0", "v1"}, served
        assert_versions_whole(sessions, settings.versions_dir)


# --- PostgreSQL restarted ----------------------------------------------------------------------


class PostgresCluster:
    """A private PostgreSQL cluster in a temporary directory, on its own port."""

    def __init__(self) -> None:
        self.port = free_port()
        # Not under pytest's tmp_path: the postgres user must be able to reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="flm-pg-"))
        self.log = self.dir / "server.log"
        self._as = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        """SQLAlchemy URL of its `postgres` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([*self._as, str(PG_BIN / program), *args], check=True, capture_output=True)

    def init(self) -> None:
        """Create the cluster (trust authentication, user postgres)."""
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust",
                  "--no-sync")  # fmt: skip

    def pg_ctl(self, action: str) -> None:
        """`pg_ctl start`, `stop` (fast) or `restart` (fast), waiting until it is done."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", action, "-D", str(self.dir / "data"), "-o", options, "-l",
                  str(self.log), "-m", "fast", "-w")  # fmt: skip

    def remove(self) -> None:
        """Stop it (at once) and delete its files."""
        subprocess.run(
            [*self._as, str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.dir / "data"), "-m",
             "immediate"], capture_output=True,
        )  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PostgresCluster]:
    """A private PostgreSQL, started and migrated."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run initdb as")
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.pg_ctl("start")
        upgrade(cluster.url)
        yield cluster
    finally:
        cluster.remove()


@dataclass
class Rater:
    """Rates each of `ids` once, from a thread, retrying on 503 until it is acknowledged."""

    client: httpx.Client
    ids: list[int]
    acknowledged: dict[int, dict[str, Any]] = field(default_factory=dict)
    refusals: list[tuple[int, str | None, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        """The thread's loop."""
        for generation_id in self.ids:
            rating = {
                "generation_id": generation_id,
                "thumbs": random.choice(["up", "down"]),
                "stars": random.randint(1, 5),
            }
            while not self.stop.is_set():
                try:
                    response = self.client.post("/v1/feedback", json=rating)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    return
                if response.is_success:
                    self.acknowledged[generation_id] = rating
                    break
                self.refusals.append(
                    (response.status_code, response.headers.get("Retry-After"), response.text)
                )
                self.stop.wait(0.1)


@needs_initdb
class TestPostgresRestarted:
    """A private PostgreSQL the test stops and starts under the running API."""

    @pytest.fixture
    def db_url(self, postgres: PostgresCluster) -> str:
        """The private cluster's database."""
        return postgres.url

    def test_the_api_recovers_by_itself_and_keeps_what_it_acknowledged(
        self, live: str, postgres: PostgresCluster, sessions: Any
    ) -> None:
        """While the database is down: 503 with Retry-After; once it is back: 2xx at once."""
        with httpx.Client(base_url=live, headers=ADMIN, timeout=60) as client:
            body = {"prompt": "Hi", "max_new_tokens": 2}
            ids = [client.post("/v1/generate", json=body).json()["id"] for _ in range(60)]
            rater = Rater(client, ids)
            thread = threading.Thread(target=rater.run)
            thread.start()
            wait_until(lambda: len(rater.acknowledged) >= 5, 30, "the first ratings")

            postgres.pg_ctl("stop")
            for method, path in [("POST", "/v1/generate"), ("GET", "/v1/generations"),
                                 ("POST", "/v1/feedback"), ("GET", "/readyz")]:  # fmt: skip
                response = client.request(method, path, json=body if method == "POST" else None)
                assert response.status_code == 503, (path, response.text)
                assert path == "/readyz" or response.headers["Retry-After"].isdigit(), path
            postgres.pg_ctl("start")

            # The pool's connections died with the server; the next request must not notice.
            assert client.get("/readyz").status_code == 200
            assert client.post("/v1/generate", json=body).status_code == 200

            # Then once more with the server restarted under requests in flight.
            wait_until(lambda: len(rater.acknowledged) >= 20, 60, "more ratings")
            postgres.pg_ctl("restart")
            thread.join(120)
            rater.stop.set()
            assert not thread.is_alive(), "the rater did not finish"
            assert client.get("/v1/keys/me").status_code == 200

        assert rater.errors == [], rater.errors
        assert all(status == 503 and retry for status, retry, _ in rater.refusals), rater.refusals
        assert sorted(rater.acknowledged) == ids
        with sessions() as session:
            rows = {
                row.generation_id: {
                    "generation_id": row.generation_id,
                    "thumbs": row.thumbs.value if row.thumbs else None,
                    "stars": row.stars,
                }
                for row in session.scalars(select(Feedback))
            }
        assert rows == rater.acknowledged


@needs_initdb
class TestPostgresRestartedWhilePublishing:
    """A private PostgreSQL restarted at three moments of a round's publication."""

    @pytest.fixture
    def db_url(self, postgres: PostgresCluster) -> str:
        """The private cluster's database."""
        return postgres.url

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        """Few ratings make a round; a restart never makes it look lost."""
        return settings.model_copy(update={"training_min_items": 4, "training_stale_after": 60})

    @pytest.mark.parametrize(
        ("moment", "outcome"),
        [
            ("before the transaction", RunStatus.succeeded),  # the pool reconnects
            ("inside the transaction", RunStatus.failed),  # the server rolled it back
            ("after the commit, its answer lost", RunStatus.succeeded),
        ],
    )
    def test_a_round_publishes_one_whole_version_or_fails_cleanly(
        self,
        moment: str,
        outcome: RunStatus,
        settings: Settings,
        client: TestClient,
        postgres: PostgresCluster,
        sessions: Any,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Exactly one complete active version, or none and a later round publishes one; never
        a row without its directory, nor a rating used by a round that published nothing."""
        client.headers.update(ADMIN)
        rated = _rate_corrected(client, 8)
        restarts: list[str] = []

        def restart() -> None:
            if not restarts:
                restarts.append(moment)
                postgres.pg_ctl("restart")

        if moment == "before the transaction":  # the checkpoint is written, nothing recorded
            write = rounds.write_checkpoint

            def write_then_restart(*args: Any, **kwargs: Any) -> Path:
                path = write(*args, **kwargs)
                restart()
                return path

            monkeypatch.setattr(rounds, "write_checkpoint", write_then_restart)
        elif moment == "inside the transaction":  # the run locked, the ratings marked
            mark_used = rounds.mark_used

            def mark_then_restart(*args: Any, **kwargs: Any) -> None:
                mark_used(*args, **kwargs)
                restart()

            monkeypatch.setattr(rounds, "mark_used", mark_then_restart)
        else:  # the server committed, then the connection died before the client heard it
            publishing: list[Session] = []
            publish, commit = rounds._publish, Session.commit

            def noted_publish(session: Session, *args: Any, **kwargs: Any) -> Any:
                publishing.append(session)
                return publish(session, *args, **kwargs)

            def commit_then_restart(self: Session) -> None:
                commit(self)
                if publishing and self is publishing[0]:
                    publishing.clear()
                    restart()
                    lost = Exception("server closed the connection unexpectedly")
                    raise OperationalError("COMMIT", None, lost)

            monkeypatch.setattr(rounds, "_publish", noted_publish)
            monkeypatch.setattr(Session, "commit", commit_then_restart)

        run_id = queue_round(sessions, {"train": FAST, "gate": QUICK_GATE})
        status = run_round(sessions, settings, run_id)
        monkeypatch.undo()
        assert restarts == [moment]
        assert status is outcome
        assert_versions_whole(sessions, settings.versions_dir)
        with sessions() as session:
            run = session.get(TrainingRun, run_id)
            assert run is not None and run.status is outcome, run and run.reason
            used = list(session.scalars(select(Feedback.used_in_run_id)))
            assert sorted(session.scalars(select(Feedback.id))) == sorted(rated)
            if outcome is RunStatus.succeeded:
                assert run.version is not None and run.version.name == "v1", run.reason
                assert used.count(run_id) == run.counts["train_kto"] and set(used) == {run_id, None}
            else:
                assert "in publishing" in (run.reason or "") and run.version_id is None, run.reason
                assert set(used) == {None}
        if outcome is RunStatus.succeeded:
            assert version_statuses(sessions) == {"v0": "retired", "v1": "active"}
            return
        assert version_statuses(sessions) == {"v0": "active"}
        later = queue_round(sessions, {"train": FAST, "gate": QUICK_GATE})
        assert run_round(sessions, settings, later) is RunStatus.succeeded
        assert version_statuses(sessions) == {"v0": "retired", "v1": "active"}
        assert_versions_whole(sessions, settings.versions_dir)


# --- The API process killed ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A non-2xx answer, with when it came (time.monotonic())."""

    at: float
    request: str
    status_code: int
    text: str


@dataclass
class Poster:
    """Generates, rates and compares in a loop from a thread; keeps every acknowledged answer,
    and every answer that was not a 2xx."""

    base: str
    name: int
    generations: set[int] = field(default_factory=set)
    ratings: dict[int, dict[str, Any]] = field(default_factory=dict)
    comparisons: dict[tuple[int, int], str] = field(default_factory=dict)
    failures: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        """The thread's loop: transport errors (the process is gone) are retried."""
        with httpx.Client(base_url=self.base, headers=ADMIN, timeout=30) as client:
            step = 0
            while not self.stop.is_set():
                step += 1
                try:
                    self._step(client, step)
                except httpx.TransportError:
                    self.failures += 1
                    self.stop.wait(0.05)

    def _post(self, client: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
        response = client.post(path, json=body)
        if not response.is_success:
            self.refusals.append(
                Refusal(time.monotonic(), f"POST {path}", response.status_code, response.text)
            )
        return response

    def _step(self, client: httpx.Client, step: int) -> None:
        prompt = {"prompt": f"Client {self.name} question {step}?", "max_new_tokens": 2}
        pair = []
        for seed in (1, 2):
            response = self._post(client, "/v1/generate", {**prompt, "seed": seed})
            if not response.is_success:
                return
            pair.append(response.json()["id"])
            self.generations.add(pair[-1])
        for generation_id in pair:
            rating = {"generation_id": generation_id, "thumbs": random.choice(["up", "down"]),
                      "stars": random.randint(1, 5), "comment": f"step {step}"}  # fmt: skip
            if self._post(client, "/v1/feedback", rating).is_success:
                self.ratings[generation_id] = rating
        winner = random.choice(["a", "b", "tie"])
        body = {"generation_a": pair[0], "generation_b": pair[1], "winner": winner}
        if self._post(client, "/v1/comparisons", body).is_success:
            self.comparisons[(pair[0], pair[1])] = winner


def test_nothing_acknowledged_is_lost_when_the_api_process_is_killed(
    settings: Settings, tmp_path: Path, sessions: Any
) -> None:
    """SIGKILL at a random moment while clients post; after a restart every 2xx is stored, and
    every answer outside the kill window (from the kill until the new process is ready) is a
    2xx: a 4xx or 5xx there is a failure, not something to skip."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "api.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port",
             str(port), "--log-level", "warning"],
            env={
                **settings_environment(settings), "MAX_PROMPT_CHARS": "2000",
                # One key posts as fast as it can: the test is about the kill, not the limits.
                "RATE_LIMIT_GENERATION": "none", "RATE_LIMIT_FEEDBACK": "none",
                "RATE_LIMIT_READ": "none",
            },
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(lambda: api_ready(base), 120, "the API to start")
        return process

    seed = random.randrange(2**32)
    pause = random.Random(seed).uniform(0, 2)
    posters = [Poster(base, i) for i in range(4)]
    threads = [threading.Thread(target=poster.run) for poster in posters]
    api = start()
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(len(p.ratings) for p in posters) >= 10, 60, "the first ratings")
        threading.Event().wait(pause)
        killed_at = time.monotonic()
        api.send_signal(signal.SIGKILL)
        api.wait()
        before = sum(len(p.ratings) for p in posters)
        api = start()
        ready_at = time.monotonic()
        wait_until(lambda: sum(len(p.ratings) for p in posters) >= before + 10, 60, "ratings again")
    finally:
        for poster in posters:
            poster.stop.set()
        for thread in threads:
            thread.join(60)
        stop_process(api)

    assert sum(p.failures for p in posters) > 0, "the clients never found the API gone"
    outside = [
        refusal
        for poster in posters
        for refusal in poster.refusals
        if not killed_at <= refusal.at <= ready_at
    ]
    assert not outside, f"seed {seed}: non-2xx answers outside the kill window: {outside[:5]}"
    with sessions() as session:
        generations = set(session.scalars(select(Generation.id)))
        ratings = {
            row.generation_id: {
                "generation_id": row.generation_id,
                "thumbs": row.thumbs.value if row.thumbs else None,
                "stars": row.stars,
                "comment": row.comment,
            }
            for row in session.scalars(select(Feedback))
        }
        comparisons = {
            (row.generation_a_id, row.generation_b_id): row.winner.value
            for row in session.scalars(select(Comparison))
        }
    for poster in posters:
        context = f"seed {seed}, killed {pause:.2f} s after the first ratings"
        assert poster.generations <= generations, context
        assert {g: ratings.get(g) for g in poster.ratings} == poster.ratings, context
        assert {p: comparisons.get(p) for p in poster.comparisons} == poster.comparisons, context


# --- The worker killed in the gate --------------------------------------------------------------


class TestWorkerKilledInTheGate(OnSharedPostgres):
    """A Celery worker on PostgreSQL and a private Redis, killed while its round gates."""

    @pytest.fixture
    def settings(self, settings: Settings, redis_server: RedisServer) -> Settings:
        """Redis as the broker; a lost round is noticed within seconds."""
        return settings.model_copy(
            update={"redis_url": redis_server.url, "training_min_items": 4,
                    "training_stale_after": 2.0}
        )  # fmt: skip

    def test_nothing_is_half_done_and_the_next_round_succeeds(
        self, settings: Settings, client: TestClient, sessions: Any, tmp_path: Path
    ) -> None:
        """SIGKILL in the gate: no version row or directory, no rating used or lost; the task
        redelivered declares the round lost, charging one failure to the ratings of the held-out
        batch it was scoring (no other), and the next round trains on them and publishes a whole
        version."""
        client.headers.update(ADMIN)
        worker = _worker(
            settings, tmp_path / "worker.log",
            TRAINING_STALE_AFTER=str(settings.training_stale_after),
        )  # fmt: skip
        try:
            rated = _rate_corrected(client, 8)
            # A gate long enough to be killed in: 8 prompts x 128 tokens, one at a time.
            slow_gate = {"train": FAST, "gate": {"max_new_tokens": 128, "batch_size": 1}}
            response = client.post("/v1/training/runs", json=slow_gate)
            assert response.status_code == 202, response.text
            killed = response.json()["id"]

            def in_the_gate() -> bool:
                with sessions() as session:
                    run = session.get(TrainingRun, killed)
                    # Training records its curves as it ends; the gate comes next.
                    return bool(run and run.status is RunStatus.running and run.history)

            wait_until(in_the_gate, 180, "the round to reach the gate", every=0.1)
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
        finally:
            stop_process(worker)

        assert version_statuses(sessions) == {"v0": "active"}
        assert not settings.versions_dir.exists() or list(settings.versions_dir.iterdir()) == []
        with sessions() as session:
            assert sorted(session.scalars(select(Feedback.id))) == sorted(rated)
            assert set(session.scalars(select(Feedback.used_in_run_id))) == {None}
        answer = client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2})
        assert answer.status_code == 200 and answer.json()["model_version"] == "v0"

        # The task again (as Redis hands it out after the visibility timeout): once the
        # heartbeat is stale it declares the round lost, and runs nothing.
        wait_until(
            lambda: run_round(sessions, settings, killed) is RunStatus.failed, 30,
            "the killed round to be declared lost",
        )  # fmt: skip
        with sessions() as session:
            run = session.get(TrainingRun, killed)
            assert run is not None and run.live is None and run.version_id is None
            assert "worker lost" in (run.reason or ""), run.reason
            assert run.data_ids is not None and len(run.data_ids["feedback"]) == len(rated)
            charged = {
                f.id: (f.failures, f.set_aside_at) for f in session.scalars(select(Feedback))
            }
            batch = set((run.batch_ids or {}).get("feedback", []))
            assert batch <= set(rated)
            # One failure each in the batch it was killed in, none set aside.
            assert charged == {i: (1 if i in batch else 0, None) for i in rated}

        after = queue_round(sessions, {"train": FAST, "gate": QUICK_GATE})
        assert run_round(sessions, settings, after) is RunStatus.succeeded
        assert version_statuses(sessions) == {"v0": "retired", "v1": "active"}
        assert_versions_whole(sessions, settings.versions_dir)
        with sessions() as session:
            run = session.get(TrainingRun, after)
            assert run is not None and run.counts["train_kto"] + run.counts["heldout_kto"] == 8
            used = list(session.scalars(select(Feedback.used_in_run_id)))
            assert used.count(after) == run.counts["train_kto"] and set(used) <= {after, None}


# --- The disk full ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(settings: Settings) -> Iterator[Path]:
    """The versions directory on a tmpfs of its own (1 MiB), unmounted at the end."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    target = settings.versions_dir
    target.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(target)], check=True)


def _fill(directory: Path, leave: int) -> Path:
    """A file taking all the space of `directory`'s filesystem but about `leave` bytes."""
    filler = directory / "filler"
    stats = os.statvfs(directory)
    size = stats.f_bavail * stats.f_frsize - leave
    with filler.open("wb") as handle:
        handle.write(b"\0" * max(size, 0))
    return filler


class TestDiskFull(OnSharedPostgres):
    """PostgreSQL, and versions on a filesystem that fills up during a version's write."""

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        """Few ratings make a round."""
        return settings.model_copy(update={"training_min_items": 4})

    def test_the_round_fails_cleanly_and_the_next_one_publishes(
        self, settings: Settings, client: TestClient, small_disk: Path, sessions: Any
    ) -> None:
        """No space for the version: the run fails saying so, with no version row, no partial
        directory and no rating used; the active version keeps serving; once space is freed
        the next round publishes a whole version."""
        client.headers.update(ADMIN)
        follower = app_state(client.app).follower
        body = {"prompt": "Hi", "max_new_tokens": 2}
        rated = _rate_corrected(client, 8)
        first = queue_round(sessions, {"train": FAST, "gate": QUICK_GATE})
        assert run_round(sessions, settings, first) is RunStatus.succeeded
        follower.sync()
        assert client.post("/v1/generate", json=body).json()["model_version"] == "v1"

        # Room for less than half of what v1's files took: the next version cannot fit.
        needed = sum(p.stat().st_size for p in (small_disk / f"v1.run{first}").iterdir())
        filler = _fill(small_disk, needed // 2)
        rated += _rate_corrected(client, 8)
        full = queue_round(sessions, {"train": FAST, "gate": QUICK_GATE})
        assert run_round(sessions, settings, full) is RunStatus.failed
        with sessions() as session:
            run = session.get(TrainingRun, full)
            assert run is not None and run.version_id is None and run.live is None
            reason = run.reason or ""
            used = set(session.scalars(select(Feedback.used_in_run_id)))
            assert full not in used
            assert sorted(session.scalars(select(Feedback.id))) == sorted(rated)
            charged = session.scalars(select(Feedback).where(Feedback.failures > 0)).all()
            assert charged == []  # a full disk is no rating's fault
        assert "no space left" in reason.lower() and str(small_disk) in reason, reason
        assert version_statuses(sessions) == {"v0": "retired", "v1": "active"}
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler", f"v1.run{first}"]
        filler.unlink()
        assert_versions_whole(sessions, small_disk)
        follower.sync()
        answer = client.post("/v1/generate", json=body)
        assert answer.status_code == 200 and answer.json()["model_version"] == "v1"

        after = queue_round(sessions, {"train": FAST, "gate": QUICK_GATE})
        assert run_round(sessions, settings, after) is RunStatus.succeeded
        assert version_statuses(sessions) == {"v0": "retired", "v1": "retired", "v2": "active"}
        assert_versions_whole(sessions, small_disk)
        follower.sync()
        assert client.post("/v1/generate", json=body).json()["model_version"] == "v2"
