"""Command line: `python -m app.cli setup | run | keys ... | worker-ping`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click
from sqlalchemy.orm import Session

from app.config import DEFAULT_MODEL, Settings, load_settings
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.models import Role
from app.services import keys

log = logging.getLogger("app.cli")


def _setup(settings: Settings) -> str | None:
    """Create the data directory, migrate, prepare the default model and the admin key."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.sqlalchemy_url)
    if settings.model == DEFAULT_MODEL:
        from app.engine.loading import prepare_default_model  # heavy import, only when needed

        path = prepare_default_model(settings.models_dir)
        click.echo(f"default model ready in {path}")
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            return keys.ensure_bootstrap_admin(
                session, configured=settings.admin_api_key, key_file=settings.admin_key_file
            )
    finally:
        engine.dispose()


def _print_new_admin_key(new_key: str | None, settings: Settings) -> None:
    if new_key is not None:
        click.echo(f"\nAdmin API key (shown once, also kept in {settings.admin_key_file}):")
        click.echo(f"  {new_key}\n")


@click.group()
def cli() -> None:
    """feedback-lm: a language model service that improves from human feedback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
def setup() -> None:
    """Migrate the database and prepare the default model (safe to run again)."""
    settings = load_settings()
    _print_new_admin_key(_setup(settings), settings)


@cli.command()
def run() -> None:
    """Set up, then run the API with a Celery worker and beat until interrupted; once serving,
    any of them that dies is restarted after a backoff."""
    settings = load_settings()
    new_key = _setup(settings)
    python = sys.executable
    data_dir = str(settings.data_dir.resolve())
    commands = {
        "api": [python, "-m", "uvicorn", "app.main:create_app", "--factory",
                "--host", settings.host, "--port", str(settings.port)],
        # solo pool: one task at a time in the worker process, which suits long training rounds
        "worker": [python, "-m", "celery", "-A", "worker.celery_app", "worker",
                   "--pool", "solo", "--loglevel", "INFO"],
        "beat": [python, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel", "INFO",
                 "--schedule", str(Path(data_dir) / "celerybeat-schedule")],
    }  # fmt: skip
    children = {name: Supervised(name, command) for name, command in commands.items()}
    for child in children.values():
        child.start()

    def stop(*_: object) -> None:
        for child in children.values():
            if child.process.poll() is None:
                child.process.terminate()
        for child in children.values():
            try:
                child.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.process.kill()

    def on_sigterm(*_: object) -> None:
        stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    url = f"http://{settings.host}:{settings.port}"
    try:
        _wait_ready(url, {name: child.process for name, child in children.items()})
        click.echo(f"\nfeedback-lm is ready at {url}  (API docs: {url}/docs)")
        _print_new_admin_key(new_key, settings)
        if new_key is None:
            click.echo(f"Admin API key: see {settings.admin_key_file} or ADMIN_API_KEY.")
        # Once serving, a process that dies is restarted on its own: the others keep working.
        while True:
            for child in children.values():
                child.check(time.monotonic())
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


RESTART_FIRST_DELAY = 1.0
"""Seconds before the first restart of a process that died; each further death doubles it."""
RESTART_MAX_DELAY = 60.0
"""Longest wait between restarts."""
RESTART_STABLE_AFTER = 120.0
"""A process that ran this long before dying starts again from the first delay."""


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting a process that died `failures` times in a row."""
    return min(RESTART_MAX_DELAY, RESTART_FIRST_DELAY * 2 ** max(0, failures - 1))


class Supervised:
    """One process of `run`, restarted with capped exponential backoff whenever it dies."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        self.command = command
        self.failures = 0
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.process: subprocess.Popen[bytes]

    def start(self) -> None:
        """Start the process (again)."""
        self.process = subprocess.Popen(self.command)
        self.started_at = time.monotonic()
        self.restart_at = None

    def check(self, now: float) -> None:
        """Schedule a restart if the process has died; restart it once the delay has passed."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
                log.warning("%s restarted (pid %d)", self.name, self.process.pid)
            return
        code = self.process.poll()
        if code is None:
            return
        self.failures = 1 if now - self.started_at >= RESTART_STABLE_AFTER else self.failures + 1
        delay = restart_delay(self.failures)
        self.restart_at = now + delay
        log.error(
            "%s (pid %d) exited with code %d; restarting in %g s (failure %d in a row)",
            self.name, self.process.pid, code, delay, self.failures,
        )  # fmt: skip


def _wait_ready(url: str, children: dict[str, subprocess.Popen[bytes]]) -> None:
    """Wait until the API answers /readyz, failing fast if a process dies."""
    while True:
        for name, child in children.items():
            if child.poll() is not None:
                raise click.ClickException(f"{name} exited with code {child.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)


@cli.group(name="keys")
def keys_group() -> None:
    """Create, list and revoke API keys."""


def _session() -> Session:
    settings = load_settings()
    return make_sessionmaker(make_engine(settings.sqlalchemy_url))()


@keys_group.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--role", type=click.Choice([r.value for r in Role]), default=Role.user.value)
def keys_create(name: str, role: str) -> None:
    """Create a key and print its secret (shown once)."""
    with _session() as session:
        row, plaintext = keys.create_key(session, name=name, role=Role(role))
    click.echo(f"created key {row.id} ({row.role.value}) {row.name!r}:")
    click.echo(plaintext)


@keys_group.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    with _session() as session:
        for row in keys.list_keys(session):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
            click.echo(f"{row.id}\t{row.role.value}\t{row.prefix}…\t{state}\t{row.name}")


@keys_group.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key by id."""
    from app.services.errors import ServiceError

    with _session() as session:
        try:
            keys.revoke_key(session, key_id)
        except ServiceError as exc:
            raise click.ClickException(exc.message) from None
    click.echo(f"revoked key {key_id}")


@cli.command()
@click.option("--inline", is_flag=True, help="Run the round in this process, not on a worker.")
@click.option("--wait/--no-wait", default=True, help="Wait for the round to finish.")
def train(inline: bool, wait: bool) -> None:
    """Start a training round now (or show the one already live)."""
    from app.models import RunStatus
    from app.models.training_run import LIVE_STATUSES
    from app.services import training
    from app.services.errors import ServiceError
    from app.services.queue import TaskQueue

    settings = load_settings()
    sessions = make_sessionmaker(make_engine(settings.sqlalchemy_url))
    with sessions() as session:
        if inline:
            run, created = training.request_run(
                session, trigger="manual", stale_after=settings.training_stale_after,
                max_row_failures=settings.training_max_row_failures,
            )  # fmt: skip
        else:
            try:
                run, created = training.start_run(
                    session, queue=TaskQueue(settings), requested_by_id=None, config={},
                    stale_after=settings.training_stale_after,
                    max_row_failures=settings.training_max_row_failures,
                )  # fmt: skip
            except ServiceError as exc:
                raise click.ClickException(exc.message) from None
        run_id = run.id
    click.echo(f"training run {run_id} {'queued' if created else 'is already live'}")
    if inline and created:
        from worker.training.rounds import run_round

        run_round(sessions, settings, run_id)
    status = RunStatus.queued
    while wait:
        with sessions() as session:
            run = training.get_run(session, run_id)
            status = run.status
            if status not in LIVE_STATUSES:
                version = run.version.name if run.version else "none"
                click.echo(f"run {run_id}: {status.value}; version {version}")
                if run.reason:
                    click.echo(f"reason: {run.reason}")
                break
        time.sleep(2)
    if status is RunStatus.failed:
        raise SystemExit(1)


@cli.command("worker-ping")
@click.option("--timeout", default=30.0, help="Seconds to wait for a worker.")
def worker_ping(timeout: float) -> None:
    """Send a task through the broker and wait for a worker to answer it."""
    from worker.tasks import ping

    result = ping.delay()
    try:
        click.echo(result.get(timeout=timeout))
    except Exception as exc:
        raise click.ClickException(f"no worker answered within {timeout}s ({exc})") from None


def main() -> None:
    """Entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()


if __name__ == "__main__":
    main()
