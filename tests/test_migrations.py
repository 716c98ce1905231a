"""The schema comes from Alembic only, and the migrations agree with the ORM models."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from app.db import Base, make_engine
from app.migrate import alembic_config, is_current, upgrade


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

    from app.config import Settings
    from app.main import StartupError, create_app

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        model=str(tiny_model_dir),
        admin_api_key="an-admin-key-for-tests",
    )
    with (
        pytest.raises(StartupError, match=r"python -m app\.cli setup"),
        TestClient(create_app(settings)),
    ):
        pass
