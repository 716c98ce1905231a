"""The suite's Settings are what the tests say, whatever the caller's shell or `.env` holds."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from app.config import Settings
from tests.helpers import PROCESS_ENVIRONMENT, IsolatedSettings, settings_environment

# Each would change what the suite tests if the fixture took it: another model, limits that
# refuse the tests' requests, Redis instead of the embedded fallbacks, other training rules.
HOSTILE = {
    "MODEL": "/nonexistent/model",
    "MODEL_DTYPE": "bfloat16",
    "RATE_LIMIT_GENERATION": "1/hour",
    "RATE_LIMIT_FEEDBACK": "1/hour",
    "RATE_LIMIT_READ": "1/hour",
    "REDIS_URL": "redis://127.0.0.1:1/0",
    "MAX_BATCH_SIZE": "3",
    "MAX_BODY_BYTES": "2048",
    "TRAINING_MIN_ITEMS": "999",
    "LOG_LEVEL": "ERROR",
}


@pytest.fixture(autouse=True)
def hostile_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The caller's environment and a `.env` in the working directory set everything wrong;
    autouse, so it is set before any other fixture of a test (the settings) is built."""
    for name, value in HOSTILE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MAX_WAITING_REQUESTS=1\nSWAP_POLL_INTERVAL=99\n")


def defaults_of(names: list[str]) -> dict[str, object]:
    return {name: Settings.model_fields[name].default for name in names}


FIELDS = [name.lower() for name in HOSTILE if name not in ("MODEL", "MODEL_DTYPE")]
FIELDS += ["max_waiting_requests", "swap_poll_interval"]


def test_the_settings_fixture_ignores_the_environment_and_dot_env(
    settings: Settings, tiny_model_dir: Path
) -> None:
    """Built after the environment was set: still the tiny model and every default."""
    assert Settings(model="default").rate_limit_read == "1/hour"  # the environment is set
    assert Settings(model="default").max_waiting_requests == 1  # and so is .env
    assert (settings.model, settings.model_dtype) == (str(tiny_model_dir), "float32")
    assert {name: getattr(settings, name) for name in FIELDS} == defaults_of(FIELDS)
    changed = settings.model_copy(update={"rate_limit_read": None})
    assert changed.rate_limit_generation == Settings.model_fields["rate_limit_generation"].default


def test_isolated_settings_take_only_what_they_are_given() -> None:
    """The class the suite builds its settings with, on its own."""
    settings = IsolatedSettings(data_dir=Path("somewhere"))
    assert settings.data_dir == Path("somewhere")
    assert settings.model == Settings.model_fields["model"].default
    assert settings.model_dtype == Settings.model_fields["model_dtype"].default
    assert {name: getattr(settings, name) for name in FIELDS} == defaults_of(FIELDS)


def test_a_process_the_suite_starts_gets_the_settings_and_nothing_else(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's environment holds every setting as the test made it, and of the caller's
    environment only what Python needs (PATH, HOME, ...): read back there (with the `.env` in
    its working directory), it is the test's settings again."""
    monkeypatch.setenv("UNRELATED_TOKEN", "not for the worker")
    env = settings_environment(settings)
    names = {name.upper() for name in Settings.model_fields}
    assert set(env) <= names | set(PROCESS_ENVIRONMENT) and names <= set(env)
    assert "UNRELATED_TOKEN" not in env and env["PATH"] == os.environ["PATH"]
    assert (env["MODEL"], env["MAX_BATCH_SIZE"], env["REDIS_URL"]) == (settings.model, "32", "")
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().model_dump() == settings.model_dump()


def test_the_suites_settings_builders_ignore_the_environment() -> None:
    """The round rules of `tests.helpers.rules` (test_poisoning's) are the tests' own, whatever
    the environment holds; the workers the suite starts get `settings_environment` (above)."""
    from tests.helpers import rules

    defaults = defaults_of(FIELDS)
    assert {name: getattr(rules(), name) for name in FIELDS} == defaults
    assert rules(training_min_items=3).training_min_items == 3


def test_no_test_builds_settings_that_read_the_environment() -> None:
    """`Settings(_env_file=None, ...)` still reads os.environ, and a worker started with
    `**os.environ` inherits the caller's settings: the suite uses IsolatedSettings and
    `settings_environment` instead."""
    tests = Path(__file__).parent
    offenders = []
    for module in sorted(tests.rglob("*.py")):
        if module == Path(__file__):
            continue
        name = module.relative_to(tests).as_posix()
        source = module.read_text()
        if re.search(r"\bSettings\(\s*_env_file", source):
            offenders.append(f"{name}: Settings(_env_file=None, ...)")
        if "worker.celery_app" in source and "**os.environ" in source:
            offenders.append(f"{name}: a worker's environment from **os.environ")
    assert len(list(tests.rglob("test_*.py"))) > 30, "the walk found the test modules"
    assert offenders == []
