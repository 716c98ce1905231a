"""The schema comes from Alembic only, and the migrations agree with the ORM models."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from app.db import Base, make_engine, make_sessionmaker
from app.migrate import alembic_config, is_current, upgrade
from app.models import Winner
from tests.helpers import PG_ADMIN_URL, IsolatedSettings, Ratings, reset_database


@pytest.mark.parametrize("backend", ["pg_url", "sqlite_url"])
def test_migrations_match_the_models(request: pytest.FixtureRequest, backend: str) -> None:
    """A migrated database has exactly the tables, columns, types and indexes the models declare."""
    engine = make_engine(request.getfixturevalue(backend))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        assert is_current(engine)
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_round_trip(tmp_path: pytest.TempPathFactory) -> None:
    """Every migration can be undone and redone (on a scratch SQLite database)."""
    url = f"sqlite:///{tmp_path}/round-trip.db"
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert not is_current(engine)
        upgrade(url)
        assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    finally:
        engine.dispose()


def test_app_refuses_an_unmigrated_database(
    tmp_path: pytest.TempPathFactory, tiny_model_dir: object
) -> None:
    """Starting on an empty database fails with a message that says how to migrate."""
    from fastapi.testclient import TestClient

    from app.main import StartupError, create_app

    # Not the caller's DATABASE_URL (a migrated one would start): the empty one in data_dir.
    settings = IsolatedSettings(
        data_dir=tmp_path,
        model=str(tiny_model_dir),
        admin_api_key="an-admin-key-for-tests",
    )
    with (
        pytest.raises(StartupError, match=r"python -m app\.cli setup"),
        TestClient(create_app(settings)),
    ):
        pass


@pytest.mark.parametrize("backend", ["pg_url", "sqlite_url"])
def test_the_database_refuses_a_second_active_version(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """The partial unique index: any number of retired versions, never two active ones."""
    url = request.getfixturevalue(backend)
    reset_database(url)
    engine = make_engine(url)
    insert = text(
        "INSERT INTO model_versions (name, kind, base_model, path, status, manifest, created_at) "
        "VALUES (:name, 'base', 'm', 'p', :status, '{}', CURRENT_TIMESTAMP)"
    )
    try:
        with engine.begin() as connection:
            for name, status in [("v0", "retired"), ("v1", "retired"), ("v2", "active")]:
                connection.execute(insert, {"name": name, "status": status})
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(insert, {"name": "v3", "status": "active"})
    finally:
        engine.dispose()
        reset_database(url)


@pytest.fixture(params=["postgresql", "sqlite"])
def scratch_url(request: pytest.FixtureRequest, tmp_path: pytest.TempPathFactory) -> Iterator[str]:
    """An empty database, not migrated yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/scratch.db"
        return
    name = f"flm_scratch_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_migration_keeps_only_the_version_activated_last(scratch_url: str) -> None:
    """Two rows left active by the old code: a1c4e2f3b5d6 retires all but the newest activated."""
    command.upgrade(alembic_config(scratch_url), "c502e4855b29")
    engine = make_engine(scratch_url)
    try:
        with engine.begin() as connection:
            for name, status, activated in [
                ("v0", "active", "2026-01-01 00:00:00+00"),
                ("v1", "active", "2026-01-03 00:00:00+00"),
                ("v2", "active", None),
                ("v3", "rejected", None),
            ]:
                connection.execute(
                    text(
                        "INSERT INTO model_versions (name, kind, base_model, path, status, "
                        "manifest, created_at, activated_at) VALUES (:name, 'base', 'm', 'p', "
                        ":status, '{}', CURRENT_TIMESTAMP, :activated)"
                    ),
                    {"name": name, "status": status, "activated": activated},
                )
        upgrade(scratch_url)
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT name, status, status_reason FROM model_versions ORDER BY id")
            ).all()
        assert [(name, status) for name, status, _ in rows] == [
            ("v0", "retired"), ("v1", "active"), ("v2", "retired"), ("v3", "rejected"),
        ]  # fmt: skip
        assert "a1c4e2f3b5d6" in rows[0][2] and rows[1][2] is None
        assert is_current(engine)
    finally:
        engine.dispose()


def test_the_migration_forgets_failures_charged_to_whole_rounds(scratch_url: str) -> None:
    """Before b7d2e9f4a8c1 a failed round charged every rating it took, whatever failed: the
    migration clears those counts and gives back the ratings they set aside."""
    command.upgrade(alembic_config(scratch_url), "a1c4e2f3b5d6")
    engine = make_engine(scratch_url)
    try:
        with make_sessionmaker(engine)() as session:
            ratings = Ratings(session)
            one, two = ratings.generations(2)
            ratings.thumb(ratings.owner, one, up=False)
            ratings.thumb(ratings.owner, two, up=True)
            ratings.compare(ratings.owner, one, two, Winner.a)
            ratings.commit()
        with engine.begin() as connection:
            for table in ("feedback", "comparisons"):
                connection.execute(
                    text(
                        f"UPDATE {table} SET failures = 2, set_aside_at = CURRENT_TIMESTAMP, "
                        "set_aside_reason = 'in 2 failed rounds' WHERE id = 1"
                    )
                )
            connection.execute(text("UPDATE feedback SET failures = 1 WHERE id = 2"))
        upgrade(scratch_url)
        with engine.connect() as connection:
            rows = [
                *connection.execute(
                    text("SELECT failures, set_aside_at, set_aside_reason FROM feedback")
                ),
                *connection.execute(
                    text("SELECT failures, set_aside_at, set_aside_reason FROM comparisons")
                ),
            ]
        assert [tuple(row) for row in rows] == [(0, None, None)] * 3
        assert is_current(engine)
    finally:
        engine.dispose()
