"""Shared fixtures: a tiny model with the real tokenizer, migrated databases, the app."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from sqlalchemy import select, text

from app.config import Settings
from app.db import Base, make_engine, make_sessionmaker
from app.main import create_app
from app.migrate import upgrade
from app.models import ModelVersion, VersionKind, VersionStatus

ROOT = Path(__file__).resolve().parents[1]
# Downloads and conversions survive between runs here (git-ignored).
CACHE = Path(os.environ.get("FEEDBACK_LM_TEST_CACHE", ROOT / ".cache"))
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ADMIN_KEY = "test-admin-key-0123456789"


class IsolatedSettings(Settings):
    """Settings made only from what a test passes: never from the caller's environment (MODEL,
    RATE_LIMIT_*, REDIS_URL, ...) nor from a `.env` file, so a developer's shell cannot change
    what the suite tests."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


PROCESS_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "PYTHONPATH")
"""What a process the suite starts keeps of the caller's environment: what Python and its
libraries need to run, nothing that configures the service."""


def settings_environment(settings: Settings) -> dict[str, str]:
    """The whole environment of a process the suite starts (a worker, beat): every setting, from
    `settings` (a setting the caller's shell or a `.env` holds cannot reach it: the environment
    wins over `.env`), and of the caller's environment only PROCESS_ENVIRONMENT."""
    env = {name: os.environ[name] for name in PROCESS_ENVIRONMENT if name in os.environ}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        env[name.upper()] = "" if value is None else str(value)  # "": unset, as the app reads it
    return env


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a server or worker the test started: SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    """The default model's tokenizer (and chat template), extracted from its GGUF once."""
    target = CACHE / "tokenizer"
    if not (target / "tokenizer_config.json").is_file():
        from app.engine.loading import fetch_default_gguf, tokenizer_from_gguf

        tokenizer = tokenizer_from_gguf(fetch_default_gguf(CACHE / "gguf"))
        partial = target.with_name("tokenizer.partial")
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(real_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised Llama with the default model's shape family and its real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    target = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database on this machine, dropped at the end."""
    name = f"flm_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0]
    url = f"{url}/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite database file."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'test.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each API test runs on PostgreSQL and on SQLite, starting from empty tables."""
    url: str = request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")
    reset_database(url)
    return url


def reset_database(url: str) -> None:
    """Empty every table (the schema stays migrated)."""
    engine = make_engine(url)
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                conn.execute(text(f"DELETE FROM {table}"))
            if _has_sqlite_sequence(conn):
                conn.execute(text("DELETE FROM sqlite_sequence"))
    engine.dispose()


def _has_sqlite_sequence(conn: object) -> bool:
    result = conn.execute(  # type: ignore[attr-defined]
        text("SELECT name FROM sqlite_master WHERE name='sqlite_sequence'")
    )
    return result.first() is not None


@pytest.fixture
def settings(db_url: str, tiny_model_dir: Path, tmp_path: Path) -> Settings:
    """Settings for one test: its own data directory, the tiny model, a known admin key; the
    rest are the defaults, whatever the environment or a `.env` file say."""
    return IsolatedSettings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        model=str(tiny_model_dir),
        model_dtype="float32",
        admin_api_key=ADMIN_KEY,
        max_prompt_chars=2000,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The app, started (lifespan run) against the test database."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def admin() -> dict[str, str]:
    """Headers of the bootstrap admin key."""
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def user(client: TestClient, admin: dict[str, str]) -> dict[str, str]:
    """Headers of a fresh user key."""
    response = client.post("/v1/keys", json={"name": "rater", "role": "user"}, headers=admin)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


@pytest.fixture
def sessions(settings: Settings) -> Iterator[object]:
    """A session factory on the test database, to check what was stored."""
    engine = make_engine(settings.sqlalchemy_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """The first true value `condition` returns, polling every `every` seconds; fails the test
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def api_ready(base: str) -> bool:
    """Whether the API at `base` answers /readyz with 200 (its model is loaded)."""
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


LIVE_APPS: dict[str, object] = {}
"""The app behind each live server, by URL (tests reach its engine and registry)."""


@pytest.fixture
def live(settings: Settings) -> Iterator[str]:
    """The app in a real uvicorn server on a free port, for the browser to load."""
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    LIVE_APPS[url] = app
    yield url
    del LIVE_APPS[url]
    server.should_exit = True
    thread.join(30)


def version_statuses(sessions: Any) -> dict[str, str]:
    """Every model version's status, by name."""
    with sessions() as session:
        return {v.name: v.status.value for v in session.scalars(select(ModelVersion))}


def assert_versions_whole(sessions: Any, versions_dir: Path) -> None:
    """No half-written version: at most one active, every adapter row's directory complete (its
    files match its manifest), and no directory under `versions_dir` that no row names, partial
    (`.tmp-*`) or renamed."""
    from app.engine.checkpoints import verify_checkpoint

    with sessions() as session:
        rows = list(session.scalars(select(ModelVersion)))
    assert [v.status for v in rows].count(VersionStatus.active) <= 1, rows
    for row in rows:
        if row.kind is VersionKind.adapter:
            verify_checkpoint(Path(row.path))
    on_disk = {p.name for p in versions_dir.iterdir()} if versions_dir.is_dir() else set()
    assert on_disk <= {v.name for v in rows if v.kind is VersionKind.adapter}, on_disk


def queue_round(sessions: Any, config: dict[str, Any] | None = None) -> int:
    """Queue a training round (as the API would, without a task) and return its id."""
    from app.services.training import request_run

    with sessions() as session:
        run, created = request_run(session, trigger="manual", config=config or {})
        assert created, f"round {run.id} is live already"
        return run.id
