"""Faults of a real deployment, each on real servers: Redis stopped, PostgreSQL restarted, the API
process killed. Generation and ratings keep being accepted where they can be, outages answer 503
with Retry-After (never 500), the service recovers by itself, and nothing acknowledged is lost.

The worker killed mid-round is in test_worker_rounds.py; a corrupt or missing version in
test_training.py.
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
from sqlalchemy import select

from app.config import Settings
from app.migrate import upgrade
from app.models import Comparison, Feedback, Generation
from tests.conftest import ADMIN_KEY, api_ready, free_port, reset_database, stop_process, wait_until
from tests.test_training import FAST, QUICK_GATE
from tests.test_worker_rounds import _env

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PG_BIN = next(
    (p.parent for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)),
    Path(shutil.which("initdb") or "/nonexistent").parent,
)
needs_initdb = pytest.mark.skipif(
    not (PG_BIN / "initdb").is_file(),
    reason="PostgreSQL's initdb is not installed (looked in /usr/lib/postgresql/*/bin and PATH)",
)


def _worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """A Celery worker process on the settings' broker and database."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
         "--loglevel", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        env=_env(settings), stdout=log.open("wb"), stderr=subprocess.STDOUT,
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


class TestRedisStopped:
    """PostgreSQL and a private Redis (broker, rate limits, version announcements)."""

    @pytest.fixture
    def db_url(self, pg_url: str) -> str:
        """The shared PostgreSQL only (Redis goes with it in deployments)."""
        reset_database(pg_url)
        return pg_url

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
                **_env(settings), "MAX_PROMPT_CHARS": "2000",
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
