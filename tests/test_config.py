"""Settings: defaults, validation, and a wrong setting stopping start-up with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.helpers import IsolatedSettings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_embedded(tmp_path: Path) -> None:
    """Without settings: SQLite in the data directory, no Redis, the bundled model."""
    settings = IsolatedSettings(data_dir=tmp_path)
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'feedback.db'}"
    assert settings.redis_url is None
    assert settings.model == "default"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", "0"),
        ("port", "http"),
        ("database_url", "mysql://x"),
        ("redis_url", "localhost:6379"),
        ("admin_api_key", "short"),
        ("model", "/no/such/model"),
        ("model_dtype", "float8"),
    ],
)
def test_bad_values_are_refused(field: str, value: str) -> None:
    """Each bad value is refused and the error names the setting."""
    with pytest.raises(ValidationError) as caught:
        IsolatedSettings(**{field: value})  # type: ignore[arg-type]
    assert caught.value.errors()[0]["loc"][0] == field


def test_empty_values_mean_unset() -> None:
    """`REDIS_URL=` in a .env file means no Redis, not an invalid URL."""
    assert IsolatedSettings(redis_url="", database_url="").redis_url is None


@pytest.mark.parametrize(
    ("env", "name", "secret"),
    [
        ({"PORT": "eighty"}, "PORT", None),
        ({"ADMIN_API_KEY": "tiny-secret"}, "ADMIN_API_KEY", "tiny-secret"),
    ],
)
def test_cli_stops_with_one_line_naming_the_setting(
    tmp_path: Path, env: dict[str, str], name: str, secret: str | None
) -> None:
    """`app.cli setup` with a wrong setting exits 2 with one line; secrets are not echoed."""
    environment = {**os.environ, "DATA_DIR": str(tmp_path), **env}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "setup"], cwd=tmp_path, env=environment,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"invalid setting {name}:")
    if secret:
        assert secret not in result.stderr
    assert not (tmp_path / "feedback.db").exists()


def test_the_visibility_timeout_must_exceed_the_longest_round() -> None:
    """Redis must not hand a round to a second worker while it may still run: a visibility
    timeout at or below TRAINING_MAX_SECONDS is refused, naming both; the defaults leave room."""
    with pytest.raises(ValidationError) as caught:
        IsolatedSettings(training_max_seconds=7200, training_visibility_timeout=7200)
    error = caught.value.errors()[0]
    assert error["loc"][0] == "training_visibility_timeout"
    assert "TRAINING_MAX_SECONDS" in error["msg"]
    defaults = IsolatedSettings()
    assert 0 < defaults.training_max_seconds <= defaults.training_visibility_timeout / 2
    assert IsolatedSettings(training_max_seconds=1, training_visibility_timeout=2)
