"""Static checks of the deployment files: docker-compose.yml, the Dockerfile and .dockerignore."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("migrate", "api", "worker", "beat")
LONG_RUNNING = ("api", "worker", "beat")
ALL_SERVICES = ("postgres", "redis", *APP_SERVICES)
DATA_DIR = "/data"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# `${NAME}`, `${NAME:-default}`, `${NAME:?message}` ... as compose interpolates them.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>[^}]*)\}")
# A secret must be required from the environment: `${NAME:?message}`, never a default.
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed once (YAML anchors and merge keys resolved)."""
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `services` mapping of docker-compose.yml."""
    found = compose.get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services"
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    return _parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _parse_dockerfile(text: str) -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    if pending:
        keyword, _, args = pending.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def _exec_form(args: str) -> list[str]:
    """Arguments of CMD/ENTRYPOINT/RUN as a list, for both the JSON and the shell form."""
    if args.startswith("["):
        parsed = json.loads(args)
        assert isinstance(parsed, list)
        return [str(item) for item in parsed]
    return shlex.split(args)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command, "service has no command"
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _healthcheck_test(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def _volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, for short (`src:dst[:mode]`) and long volume syntax."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            mounts[rest.split(":")[0]] = source
        else:
            mounts[str(volume["target"])] = str(volume.get("source", ""))
    return mounts


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {
        name: (spec or {}).get("condition", "service_started") for name, spec in depends.items()
    }


def _without_interpolation(value: str) -> str:
    return INTERPOLATION.sub("placeholder", value)


def _option(tokens: list[str], *names: str) -> str | None:
    """The value of a command-line option given as `--name value` or `--name=value`."""
    for index, token in enumerate(tokens):
        for name in names:
            if token == name and index + 1 < len(tokens):
                return tokens[index + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a parent package is missing
        return None


def _torch_pin() -> str:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for requirement in pyproject["project"]["dependencies"]:
        match = re.fullmatch(r"torch\s*==\s*(\S+)", requirement.strip())
        if match:
            return match.group(1)
    raise AssertionError("pyproject.toml does not pin torch with ==")


# ---------------------------------------------------------------------------------------------
# docker-compose.yml: services, shared settings, volumes


def test_all_services_exist(services: dict[str, dict[str, Any]]) -> None:
    """Postgres, redis, migrate, api, worker and beat are all defined."""
    missing = sorted(set(ALL_SERVICES) - set(services))
    assert not missing, f"missing services: {missing}"


def test_app_services_share_build_and_image(services: dict[str, dict[str, Any]]) -> None:
    """Every app service runs the same image, built from this repository's Dockerfile."""
    builds = {
        name: (repr(services[name].get("build")), services[name].get("image"))
        for name in APP_SERVICES
    }
    assert len(set(builds.values())) == 1, f"app services differ in build/image: {builds}"
    build = services["migrate"].get("build")
    assert build is not None, "app services have no build section"
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_app_services_share_environment(services: dict[str, dict[str, Any]]) -> None:
    """Migrate, api, worker and beat see exactly the same environment."""
    reference = _environment(services["migrate"])
    for name in APP_SERVICES:
        assert _environment(services[name]) == reference, f"{name} environment differs from migrate"
    for key in ("DATA_DIR", "DATABASE_URL", "REDIS_URL", "MODEL", "ADMIN_API_KEY"):
        assert key in reference, f"app environment lacks {key}"
    assert reference["DATA_DIR"] == DATA_DIR


def test_app_services_share_data_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """Every app service mounts the same named volume at /data."""
    sources = {name: _volume_mounts(services[name]).get(DATA_DIR) for name in APP_SERVICES}
    assert None not in sources.values(), f"not every app service mounts {DATA_DIR}: {sources}"
    assert len(set(sources.values())) == 1, f"app services mount different volumes: {sources}"
    volume = sources["migrate"]
    assert volume in (compose.get("volumes") or {}), f"{volume!r} is not a named volume"


def test_postgres_data_is_on_a_named_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """PostgreSQL keeps its data on a named volume, so it survives `docker compose down`."""
    source = _volume_mounts(services["postgres"]).get("/var/lib/postgresql/data")
    assert source in (compose.get("volumes") or {}), "postgres data is not on a named volume"


def test_database_url_points_at_postgres_service(services: dict[str, dict[str, Any]]) -> None:
    """DATABASE_URL uses psycopg and the postgres service's host, port, user and database."""
    raw = _environment(services["migrate"])["DATABASE_URL"]
    url = urlsplit(_without_interpolation(raw))
    postgres_env = _environment(services["postgres"])
    assert url.scheme == "postgresql+psycopg"
    assert url.hostname == "postgres"
    assert (url.port or 5432) == 5432
    assert url.username == postgres_env.get("POSTGRES_USER", "postgres")
    assert url.path.lstrip("/") == postgres_env.get("POSTGRES_DB", url.username)


def test_redis_url_points_at_redis_service(services: dict[str, dict[str, Any]]) -> None:
    """REDIS_URL names the redis service."""
    url = urlsplit(_without_interpolation(_environment(services["migrate"])["REDIS_URL"]))
    assert url.scheme == "redis"
    assert url.hostname == "redis"
    assert (url.port or 6379) == 6379


# ---------------------------------------------------------------------------------------------
# docker-compose.yml: secrets


def test_secrets_come_from_environment(services: dict[str, dict[str, Any]]) -> None:
    """Every password/key setting is a required `${VAR:?...}` interpolation, never a literal."""
    for service_name, service in services.items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.fullmatch(value), (
                    f"{service_name}.{key} must be `${{VAR:?message}}`, not a literal or default"
                )


def test_database_password_is_interpolated(services: dict[str, dict[str, Any]]) -> None:
    """DATABASE_URL's password is the same variable postgres is started with."""
    raw = _environment(services["migrate"])["DATABASE_URL"]
    match = re.fullmatch(r"[^:]+://[^:@/]+:(?P<password>\$\{[^}]+\})@.+", raw)
    assert match, "DATABASE_URL's password must be a `${...}` interpolation"
    password = INTERPOLATION.fullmatch(match.group("password"))
    postgres_password = INTERPOLATION.fullmatch(
        _environment(services["postgres"])["POSTGRES_PASSWORD"]
    )
    assert password and postgres_password
    assert password.group("name") == postgres_password.group("name")


def test_admin_api_key_is_required(services: dict[str, dict[str, Any]]) -> None:
    """ADMIN_API_KEY is required from the environment."""
    value = _environment(services["api"])["ADMIN_API_KEY"]
    match = INTERPOLATION.fullmatch(value)
    assert match and match.group("name") == "ADMIN_API_KEY"
    assert REQUIRED_VARIABLE.fullmatch(value)


# ---------------------------------------------------------------------------------------------
# docker-compose.yml: healthchecks and start order


@pytest.mark.parametrize("name", ["postgres", "redis", "api", "worker"])
def test_service_has_healthcheck(services: dict[str, dict[str, Any]], name: str) -> None:
    """The services others wait for, and the api and worker, have enabled healthchecks."""
    healthcheck = services[name].get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable"), f"{name} healthcheck is disabled"
    assert healthcheck.get("test") not in (None, [], ["NONE"]), f"{name} healthcheck has no test"


def test_healthcheck_commands(services: dict[str, dict[str, Any]]) -> None:
    """Healthchecks use tools that exist in their images and probe the right thing."""
    assert "pg_isready" in _healthcheck_test(services["postgres"])
    assert "redis-cli ping" in _healthcheck_test(services["redis"])
    api_check = _healthcheck_test(services["api"])
    assert "urllib" in api_check and "curl" not in api_check, "the slim image has no curl"
    api_port = _option(_command(services["api"]), "--port")
    assert f"http://127.0.0.1:{api_port}/readyz" in api_check
    worker_check = _healthcheck_test(services["worker"])
    worker_app = _option(_command(services["worker"]), "-A", "--app")
    assert f"celery -A {worker_app} inspect ping" in worker_check
    # `$$` is compose's escape: the container's shell, not compose, expands $HOSTNAME.
    assert "celery@$$HOSTNAME" in worker_check


def test_migrate_runs_once_after_postgres(services: dict[str, dict[str, Any]]) -> None:
    """Migrate waits for a healthy postgres and is never restarted."""
    migrate = services["migrate"]
    assert _depends_on(migrate).get("postgres") == "service_healthy"
    # An unquoted `no` would be YAML's False, which compose rejects.
    assert migrate.get("restart") == "no"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_start_order(services: dict[str, dict[str, Any]], name: str) -> None:
    """Api, worker and beat start after migrate succeeded and postgres/redis are healthy."""
    depends = _depends_on(services[name])
    assert depends.get("migrate") == "service_completed_successfully"
    assert depends.get("postgres") == "service_healthy"
    assert depends.get("redis") == "service_healthy"


def test_api_port_is_published(services: dict[str, dict[str, Any]]) -> None:
    """The api's listening port is the container port published by compose."""
    api_port = _option(_command(services["api"]), "--port")
    published = [str(port).rsplit(":", 1)[-1] for port in services["api"].get("ports") or []]
    assert api_port in published


def test_beat_schedule_is_on_data_volume(services: dict[str, dict[str, Any]]) -> None:
    """Beat keeps its schedule on the persistent /data volume."""
    schedule = _option(_command(services["beat"]), "--schedule", "-s")
    assert schedule and schedule.startswith(DATA_DIR + "/")


# ---------------------------------------------------------------------------------------------
# docker-compose.yml: commands name real modules (needs the application code)


def test_migrate_command_module_exists(services: dict[str, dict[str, Any]]) -> None:
    """`python -m X` in migrate names an importable module."""
    tokens = _command(services["migrate"])
    assert tokens[:2] == ["python", "-m"], tokens
    assert _find_spec(tokens[2]) is not None, f"module {tokens[2]} not found"


def test_api_command_factory_exists(services: dict[str, dict[str, Any]]) -> None:
    """`uvicorn pkg.mod:attr --factory` names a callable app factory."""
    tokens = _command(services["api"])
    assert tokens[0] == "uvicorn" and "--factory" in tokens, tokens
    target = next(token for token in tokens[1:] if not token.startswith("-"))
    module_name, _, attribute = target.partition(":")
    assert attribute == "create_app", target
    factory = getattr(importlib.import_module(module_name), attribute, None)
    assert callable(factory), f"{target} is not callable"


@pytest.mark.parametrize("name", ["worker", "beat"])
def test_celery_app_exists(services: dict[str, dict[str, Any]], name: str) -> None:
    """`celery -A pkg.mod` names a module with a `celery_app` that celery itself resolves."""
    tokens = _command(services[name])
    assert tokens[0] == "celery", tokens
    app_name = _option(tokens, "-A", "--app")
    assert app_name, f"{name} command has no -A"
    module = importlib.import_module(app_name)
    assert hasattr(module, "celery_app"), f"{app_name} has no attribute celery_app"

    from celery import Celery
    from celery.app.utils import find_app

    assert isinstance(module.celery_app, Celery)
    assert isinstance(find_app(app_name), Celery), f"celery -A {app_name} finds no Celery app"


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_base_image(dockerfile: list[tuple[str, str]]) -> None:
    """The image is built on python:3.11-slim."""
    bases = [args.split()[0] for keyword, args in dockerfile if keyword == "FROM"]
    assert bases, "no FROM"
    assert bases[-1] == "python:3.11-slim" or bases[-1].startswith("python:3.11-slim@")


def test_dockerfile_installs_cpu_torch_first(dockerfile: list[tuple[str, str]]) -> None:
    """Torch is pyproject's pin, from the CPU index, installed before the project itself."""
    runs = [args for keyword, args in dockerfile if keyword == "RUN"]
    pin = f"torch=={_torch_pin()}"
    torch_runs = [i for i, args in enumerate(runs) if pin in args and TORCH_CPU_INDEX in args]
    assert torch_runs, f"no RUN installs {pin} from {TORCH_CPU_INDEX}"
    project_runs = [
        i for i, args in enumerate(runs) if re.search(r"pip install\b.*\s\.(\s|$)", args)
    ]
    assert project_runs, "no RUN does `pip install .`"
    assert torch_runs[0] < project_runs[0], "torch must be installed before the project"


def test_dockerfile_runs_as_non_root(dockerfile: list[tuple[str, str]]) -> None:
    """The last USER is not root."""
    users = [args.split(":")[0] for keyword, args in dockerfile if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1] not in ("root", "0")


def test_dockerfile_layout(dockerfile: list[tuple[str, str]]) -> None:
    """WORKDIR /srv, DATA_DIR=/data as a volume, unbuffered output, port 8000 exposed."""
    text = "\n".join(f"{keyword} {args}" for keyword, args in dockerfile)
    assert ("WORKDIR", "/srv") in dockerfile
    assert re.search(r"^ENV .*\bDATA_DIR=/data\b", text, re.MULTILINE)
    assert re.search(r"^ENV .*\bPYTHONUNBUFFERED=1\b", text, re.MULTILINE)
    assert any(keyword == "VOLUME" and DATA_DIR in args for keyword, args in dockerfile)
    assert any(keyword == "EXPOSE" and "8000" in args.split() for keyword, args in dockerfile)


def test_dockerfile_default_command_runs_api(dockerfile: list[tuple[str, str]]) -> None:
    """The default CMD/ENTRYPOINT starts the api factory."""
    commands = [
        _exec_form(args) for keyword, args in dockerfile if keyword in ("CMD", "ENTRYPOINT")
    ]
    assert commands, "no CMD or ENTRYPOINT"
    tokens = [token for command in commands for token in command]
    assert "app.main:create_app" in tokens and "--factory" in tokens


def test_dockerfile_copies_existing_files(dockerfile: list[tuple[str, str]]) -> None:
    """Every COPY source exists in the repository and is not excluded by .dockerignore."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, args in dockerfile:
        if keyword != "COPY" or "--from" in args:
            continue
        sources = [token for token in _exec_form(args) if not token.startswith("--")][:-1]
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"COPY source {source} does not exist"
            for pattern in patterns:
                bare = pattern.removeprefix("**/").rstrip("/")
                assert not fnmatch.fnmatch(path, bare), f".dockerignore {pattern!r} hides {source}"


# ---------------------------------------------------------------------------------------------
# docker compose itself, where its CLI is installed


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone is not None else None


def _run_compose_config(cli: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli, "--env-file", os.devnull, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_config_validates() -> None:
    """`docker compose config` accepts the file, and refuses it without the secrets."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the `docker compose` plugin nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "ADMIN_API_KEY")}
    complete = _run_compose_config(
        cli, {**env, "POSTGRES_PASSWORD": "test-password", "ADMIN_API_KEY": "x" * 32}
    )
    assert complete.returncode == 0, complete.stderr
    missing = _run_compose_config(cli, env)
    assert missing.returncode != 0, "compose accepted the file without POSTGRES_PASSWORD"
