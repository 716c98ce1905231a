"""Shared fixtures: a tiny model with the real tokenizer, migrated databases, the app."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.main import create_app
from app.migrate import upgrade
from tests.helpers import (
    ADMIN_KEY,
    CACHE,
    LIVE_APPS,
    PG_ADMIN_URL,
    IsolatedSettings,
    free_port,
    reset_database,
    write_small_suite,
)


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


@pytest.fixture(scope="session")
def small_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few items of each kind from the evaluation suite: every round evaluates its candidate,
    and the whole suite would cost each round test seconds (tests/training/test_evaluation.py
    runs the whole one)."""
    return write_small_suite(tmp_path_factory.mktemp("evaluation-suite"))


@pytest.fixture
def settings(db_url: str, tiny_model_dir: Path, tmp_path: Path, small_suite: Path) -> Settings:
    """Settings for one test: its own data directory, the tiny model, a known admin key, a small
    evaluation suite; the rest are the defaults, whatever the environment or a `.env` say."""
    return IsolatedSettings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        model=str(tiny_model_dir),
        model_dtype="float32",
        admin_api_key=ADMIN_KEY,
        max_prompt_chars=2000,
        evaluation_dir=small_suite,
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
