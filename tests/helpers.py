"""Helpers that more than one test module uses: plain functions, classes and constants.

Fixtures are in `conftest.py`, which pytest shares with every folder under `tests/` and which no
module imports. A test module imports from `tests.helpers` only, never from another test module
(`tests/test_layout.py`).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from starlette.routing import Mount

from app.config import Settings
from app.db import Base, make_engine
from app.engine.checkpoints import write_checkpoint
from app.models import (
    ApiKey,
    Comparison,
    Feedback,
    Generation,
    ModelVersion,
    Role,
    Task,
    Thumbs,
    VersionKind,
    VersionStatus,
    Winner,
)
from app.services.training import request_run
from app.services.versions import next_name

ROOT = Path(__file__).resolve().parents[1]


# Downloads and conversions survive between runs here (git-ignored).
CACHE = Path(os.environ.get("FEEDBACK_LM_TEST_CACHE", ROOT / ".cache"))


PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


ADMIN_KEY = "test-admin-key-0123456789"


LIVE_APPS: dict[str, object] = {}
"""The app behind each live server, by URL (tests reach its engine and registry)."""


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
    assert on_disk <= {Path(v.path).name for v in rows if v.kind is VersionKind.adapter}, on_disk


def queue_round(sessions: Any, config: dict[str, Any] | None = None) -> int:
    """Queue a training round (as the API would, without a task) and return its id."""
    from app.services.training import request_run

    with sessions() as session:
        run, created = request_run(session, trigger="manual", config=config or {})
        assert created, f"round {run.id} is live already"
        return run.id


# --- the app's routes -----------------------------------------------------------------------------

# Routes that exist today; the enumeration below must find at least these (so a change in how
# FastAPI exposes routes cannot make the 401 test silently check nothing).
KNOWN_V1_ROUTES = {
    ("POST", "/v1/generate"),
    ("POST", "/v1/translate"),
    ("POST", "/v1/qa"),
    ("GET", "/v1/generations"),
    ("GET", "/v1/generations/{generation_id}"),
    ("POST", "/v1/feedback"),
    ("POST", "/v1/comparisons"),
    ("GET", "/v1/export"),
    ("GET", "/v1/models"),
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys"),
    ("DELETE", "/v1/keys/{key_id}"),
}


def v1_routes(app: FastAPI) -> list[tuple[str, str, bool]]:
    """(method, path, has a body) of every API route under /v1.

    Since FastAPI 0.137 `app.routes` holds one lazy wrapper per included router rather than its
    APIRoutes; `iter_route_contexts` flattens them into one context per endpoint.
    """
    found = []
    for context in iter_route_contexts(app.routes):
        route, path = context.original_route, context.path or ""
        if isinstance(route, APIRoute) and path.startswith("/v1"):
            for method in sorted(route.methods or ()):
                found.append((method, path, route.body_field is not None))
    return found


Route = tuple[str, str]

PUBLIC_MOUNTS = {"/static", "/static-offline-docs"}  # the pages' and the docs' own files


def routes(app: FastAPI) -> set[Route]:
    """(method, path) of every route the app serves, included routers flattened."""
    found = set()
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, Mount):
            assert route.path in PUBLIC_MOUNTS, f"unexpected mount {route.path}"
            continue
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


def url(path: str) -> str:
    """The path with every parameter filled in."""
    return re.sub(r"\{[^}]+\}", "1", path)


# --- training rounds ------------------------------------------------------------------------------

BETTER = "Certainly! Here is a short, friendly answer."
# Rounds on the tiny model stay fast: few ratings, one pass, short gate answers.
FAST = {"learning_rate": 1e-2, "epochs": 1, "batch_size": 8}
UNBOUNDED_EVALUATION = {
    "repetition_slack": 1.0, "min_distinct_ratio": 0.0, "max_length_change": 10.0,
    "min_opening_ratio": 0.0, "max_perplexity_growth": 1e12, "max_reference_drop": 1.0,
}  # fmt: skip
"""Gate options that turn the evaluation's degeneration bounds off: the tiny model's trained
answers repeat the correction they learnt, which the bounds rightly reject; tests of rounds'
other behaviour need a round that can pass (tests/training/test_evaluation.py tests the bounds)."""
QUICK_GATE = {"max_new_tokens": 8, **UNBOUNDED_EVALUATION}
RATED = 10


def rate_with_corrections(client: TestClient, headers: dict[str, str], count: int) -> list[int]:
    """`count` generations, each rated down and corrected to the same better answer."""
    ids = []
    for i in range(count):
        body = {"prompt": f"Question number {i}?", "max_new_tokens": 6, "seed": i}
        generation = client.post("/v1/generate", json=body, headers=headers).json()
        ids.append(generation["id"])
        response = client.post(
            "/v1/feedback",
            json={"generation_id": generation["id"], "thumbs": "down", "correction": BETTER},
            headers=headers,
        )
        assert response.status_code == 201, response.text
    return ids


def start(sessions: Any, config: dict[str, Any] | None = None) -> int:
    """Queue a manual round with `config`; its run's id."""
    with sessions() as session:
        run, created = request_run(session, trigger="manual", config=config or {})
        assert created
        return run.id


def write_small_suite(directory: Path, per_kind: int = 2) -> Path:
    """A copy of the evaluation suite's first `per_kind` translations, questions and open
    prompts in `directory`, for tests whose rounds need an evaluation but not its figures."""
    from worker.training.evaluation import SUITE_DIR

    references = (SUITE_DIR / "references.jsonl").read_text().splitlines()
    kept = [
        line
        for task in ("translate", "qa")
        for line in [r for r in references if f'"task": "{task}"' in r][:per_kind]
    ]
    (directory / "references.jsonl").write_text("\n".join(kept) + "\n")
    prompts = (SUITE_DIR / "prompts.jsonl").read_text().splitlines()[:per_kind]
    (directory / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    return directory


def rules(**changes: Any) -> Settings:
    """Default round rules (the defaults are what is tested, whatever the environment says),
    with `changes`."""
    return IsolatedSettings(**changes)


class Ratings:
    """Writes keys, generations and ratings straight to the database, one tick apart in time."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.clock = itertools.count()
        version = ModelVersion(
            name="v0",
            kind=VersionKind.base,
            base_model="tiny",
            path="tiny",
            status=VersionStatus.active,
        )
        session.add(version)
        session.flush()
        self.version_id = version.id
        self.owner = self.key("owner")

    def _now(self) -> datetime:
        return datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=next(self.clock))

    def key(self, name: str, revoked: bool = False) -> int:
        """A user key's id."""
        key = ApiKey(
            name=name,
            role=Role.user,
            key_hash=name.ljust(64, "0"),
            prefix=name[:16],
            revoked_at=self._now() if revoked else None,
        )
        self.session.add(key)
        self.session.flush()
        return key.id

    def generations(self, count: int, prompt: str = "Question") -> list[int]:
        """`count` answers to the same input (so any two can be compared)."""
        rows = [
            Generation(
                task=Task.generate,
                input={"prompt": prompt},
                input_hash=prompt.ljust(64, "0"),
                prompt=prompt,
                params={},
                output=f"answer {i} to {prompt}",
                finish_reason="stop",
                prompt_tokens=1,
                completion_tokens=3,
                latency_ms=1,
                model_version_id=self.version_id,
                api_key_id=self.owner,
            )
            for i in range(count)
        ]
        self.session.add_all(rows)
        self.session.flush()
        return [row.id for row in rows]

    def thumb(self, rater: int, generation: int, up: bool, correction: str | None = None) -> None:
        """A thumb (and optionally a better answer) on one generation."""
        now = self._now()
        self.session.add(
            Feedback(
                generation_id=generation,
                api_key_id=rater,
                correction=correction,
                thumbs=Thumbs.up if up else Thumbs.down,
                created_at=now,
                updated_at=now,
            )
        )

    def compare(self, rater: int, a: int, b: int, winner: Winner) -> None:
        """A comparison of two generations."""
        now = self._now()
        self.session.add(
            Comparison(
                generation_a_id=a,
                generation_b_id=b,
                low_generation_id=min(a, b),
                high_generation_id=max(a, b),
                winner=winner,
                api_key_id=rater,
                created_at=now,
                updated_at=now,
            )
        )

    def commit(self) -> None:
        """Store what was written."""
        self.session.commit()


# --- versions -------------------------------------------------------------------------------------


def publish_adapter(
    sessions: Any, settings: Settings, seed: int, use_dora: bool = False, scale: float = 1.0
) -> str:
    """A candidate version with random, non-zero LoRA weights, as a round would write it."""
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False, use_dora=use_dora,
    )  # fmt: skip
    adapter = get_peft_model(model, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, parameter in adapter.named_parameters():
                if "lora_" in name:
                    parameter.mul_(scale)
    with sessions() as session:
        name = next_name(session)
        parent = session.query(ModelVersion).filter_by(kind=VersionKind.base).one()
        path = write_checkpoint(
            settings.versions_dir, name, lambda d: adapter.save_pretrained(str(d)),
            {"name": name, "kind": "adapter", "parent": parent.name},
        )  # fmt: skip
        session.add(ModelVersion(
            name=name, kind=VersionKind.adapter, base_model=settings.model, path=str(path),
            parent_id=parent.id, status=VersionStatus.candidate, manifest={},
        ))  # fmt: skip
        session.commit()
    return name
