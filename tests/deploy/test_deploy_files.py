"""Static checks of the deployment files: docker-compose.yml, the nginx proxy's configuration
(deploy/nginx/default.conf), the Dockerfile and .dockerignore. tests/deploy/test_proxy.py runs
the proxy for real."""

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

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
NGINX_CONFIG = ROOT / "deploy" / "nginx" / "default.conf"
GPU_COMPOSE_FILE = ROOT / "docker-compose.gpu.yml"

APP_SERVICES = ("migrate", "api", "worker", "beat")
LONG_RUNNING = ("api", "worker", "beat")
ALL_SERVICES = ("postgres", "redis", *APP_SERVICES, "proxy")
PROXY_PORT = "8000"
"""The one port the deployment publishes: the proxy's."""
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


def _published(port: object) -> tuple[str, str]:
    """(host port, container port) of a `ports` entry, short or long syntax."""
    if isinstance(port, dict):
        return str(port.get("published")), str(port.get("target"))
    parts = str(port).split(":")
    return parts[-2], parts[-1]


def _seconds(value: str) -> float:
    """An nginx or compose duration (`300s`, `1m`, `1h`, `30s`, `10`) in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return int(match.group(1)) * scale


NginxDirective = tuple[tuple[str, ...], str, list[str]]


def _nginx() -> list[NginxDirective]:
    """deploy/nginx/default.conf as (enclosing blocks, name, arguments), blocks included."""
    return _parse_nginx(NGINX_CONFIG.read_text(encoding="utf-8"))


def _parse_nginx(text: str) -> list[NginxDirective]:
    directives: list[NginxDirective] = []
    context: list[str] = []
    words: list[str] = []
    word, quote, i = "", "", 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\" and i + 1 < len(text):
                word += text[i : i + 2]
                i += 2
                continue
            if char == quote:
                words.append(word)
                word, quote = "", ""
            else:
                word += char
        elif char in "'\"":
            quote = char
        elif char == "#":
            i = text.find("\n", i)
            if i < 0:
                break
            continue
        elif char.isspace() or char in ";{}":
            if word:
                words.append(word)
                word = ""
            if char == ";":
                directives.append((tuple(context), words[0], words[1:]))
                words = []
            elif char == "{":
                directives.append((tuple(context), words[0], words[1:]))
                context.append(" ".join(words))
                words = []
            elif char == "}":
                assert context and not words, "unbalanced } in the nginx configuration"
                context.pop()
        else:
            word += char
        i += 1
    assert not context and not words and not quote, "the nginx configuration is not closed"
    return directives


def _block(config: list[NginxDirective], *path: str) -> dict[str, list[str]]:
    """The directives directly inside the block at `path` (`"server"`, `"location"` = the
    `location /`), by name; `set` and `proxy_set_header` keyed with their first argument;
    nested `location` blocks and `error_page` lists left out (read them from `config`)."""
    wanted = tuple("location /" if step == "location" else step for step in path)
    found: dict[str, list[str]] = {}
    for context, name, args in config:
        if context != wanted:
            continue
        if name in ("set", "proxy_set_header"):
            name, args = f"{name} {args[0]}", args[1:]
        elif name in ("location", "error_page"):  # blocks and lists, looked at otherwise
            continue
        assert name not in found, f"{name} given twice in {wanted}"
        found[name] = args
    assert found or not path, f"no block {wanted} in {NGINX_CONFIG.name}"
    return found


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


def test_only_the_proxy_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    """The api publishes no host port (`--scale api=N` would collide on it), nor does anything
    else but the proxy, which publishes 8000."""
    publishing = sorted(name for name, service in services.items() if service.get("ports"))
    assert publishing == ["proxy"], publishing
    published = [_published(port) for port in services["proxy"]["ports"]]
    assert published == [(PROXY_PORT, PROXY_PORT)], published


def test_api_exposes_its_port_on_the_network(services: dict[str, dict[str, Any]]) -> None:
    """The api listens on all interfaces of its container, on the port it declares (`expose`)
    and the proxy sends to."""
    tokens = _command(services["api"])
    assert _option(tokens, "--host") == "0.0.0.0"
    api_port = _option(tokens, "--port")
    assert api_port in [str(port) for port in services["api"].get("expose") or []]
    assert "replicas" not in services["api"].get("deploy", {}), "use --scale, not a fixed count"
    assert "container_name" not in services["api"], "a fixed name cannot be scaled"


def test_api_trusts_forwarded_headers(services: dict[str, dict[str, Any]]) -> None:
    """The api takes the client's address from the proxy's X-Forwarded-For, which the proxy sets
    itself (never appending a client's own)."""
    assert _option(_command(services["api"]), "--forwarded-allow-ips") == "*"
    location = _block(_nginx(), "server", "location")
    assert location.get("proxy_set_header X-Forwarded-For") == ["$remote_addr"]


def test_api_reads_the_data_volume_only(services: dict[str, dict[str, Any]]) -> None:
    """Replicas share the data volume read-only: the worker writes versions, migrate the model."""
    for volume in services["api"].get("volumes") or []:
        if isinstance(volume, str):
            assert volume.split(":")[2:] == ["ro"], volume
        else:
            assert volume.get("read_only") is True, volume
    for name in ("migrate", "worker", "beat"):
        modes = [v.split(":")[2:] for v in services[name]["volumes"] if isinstance(v, str)]
        assert ["ro"] not in modes, f"{name} must write the data volume"


def test_api_stops_gracefully(services: dict[str, dict[str, Any]]) -> None:
    """An api container stopped or restarted gets time to finish its requests, streams too."""
    grace = services["api"].get("stop_grace_period", "10s")
    assert _seconds(str(grace)) >= 30


# ---------------------------------------------------------------------------------------------
# docker-compose.yml and deploy/nginx: the proxy


def test_proxy_is_official_nginx(services: dict[str, dict[str, Any]]) -> None:
    """The proxy runs the official nginx image at a pinned 1.x branch (1.22 or later: the file
    must also run on Debian's nginx, which tests/deploy/test_proxy.py uses), never `latest`."""
    proxy = services["proxy"]
    assert "build" not in proxy, "the proxy is the official image, not built here"
    match = re.fullmatch(r"nginx:1\.(\d+)(\.\d+)?(-[a-z0-9.-]+)?", str(proxy.get("image")))
    assert match, f"image {proxy.get('image')!r} is not a pinned official nginx:1.x tag"
    assert int(match.group(1)) >= 22
    assert proxy.get("restart") == "unless-stopped"


def test_proxy_mounts_the_deploy_config(services: dict[str, dict[str, Any]]) -> None:
    """deploy/nginx/default.conf is mounted read-only where the image's nginx.conf includes it."""
    volumes = services["proxy"].get("volumes") or []
    assert volumes == [
        f"./{NGINX_CONFIG.relative_to(ROOT).as_posix()}:/etc/nginx/conf.d/default.conf:ro"
    ], volumes
    assert NGINX_CONFIG.is_file()


def test_proxy_starts_after_a_ready_api(services: dict[str, dict[str, Any]]) -> None:
    """The proxy waits for the api's healthcheck (GET /readyz) before it takes requests."""
    assert _depends_on(services["proxy"]).get("api") == "service_healthy"
    assert "/readyz" in _healthcheck_test(services["api"])


def test_proxy_shares_nothing_with_the_app(services: dict[str, dict[str, Any]]) -> None:
    """The proxy has no database, Redis or data volume: it only forwards."""
    assert not _environment(services["proxy"])
    assert DATA_DIR not in _volume_mounts(services["proxy"])


def test_nginx_listens_on_the_published_port(services: dict[str, dict[str, Any]]) -> None:
    """nginx listens on the port compose publishes, and sends to the api service's port."""
    server = _block(_nginx(), "server")
    assert server["listen"] == [PROXY_PORT]
    api_port = _option(_command(services["api"]), "--port")
    assert server["set $api_upstream"] == [f"api:{api_port}"]


def test_nginx_re_resolves_the_replicas() -> None:
    """The upstream is a variable, resolved at request time through Docker's DNS, so replicas
    added or removed by --scale are seen; an `upstream` block would resolve `api` once."""
    config = _nginx()
    top = _block(config)
    resolver = top["resolver"]
    assert resolver[0] == "127.0.0.11", "Docker's embedded DNS"
    valid = next(arg for arg in resolver if arg.startswith("valid="))
    assert _seconds(valid.removeprefix("valid=")) <= 30
    assert "ipv6=off" in resolver
    assert not [d for d in config if d[1] == "upstream"], "an upstream block never re-resolves"
    location = _block(config, "server", "location")
    assert location["proxy_pass"] == ["http://$api_upstream"]


def test_nginx_keeps_streams_open_and_unbuffered() -> None:
    """Server-sent events pass as they come (no response buffering, no gzip) and a quiet
    stream is not cut before its first token."""
    location = _block(_nginx(), "server", "location")
    assert location["proxy_buffering"] == ["off"]
    assert location["gzip"] == ["off"]
    assert location["proxy_http_version"] == ["1.1"]
    assert _seconds(location["proxy_read_timeout"][0]) >= 300
    assert "proxy_cache" not in location


def test_nginx_fails_over_without_repeating_writes() -> None:
    """A refused connection, a timeout or a 503 (a replica not ready) passes the request on; a
    POST only when nothing was sent (no `non_idempotent`); a 429 never (limits are global)."""
    location = _block(_nginx(), "server", "location")
    cases = location["proxy_next_upstream"]
    assert {"error", "timeout", "http_503"} <= set(cases), cases
    assert "non_idempotent" not in cases and "http_429" not in cases and "off" not in cases
    assert _seconds(location["proxy_connect_timeout"][0]) <= 2
    assert _seconds(location["proxy_next_upstream_timeout"][0]) > 0
    assert location.get("proxy_request_buffering", ["on"]) == ["on"], "needed to retry a POST"
    assert location.get("proxy_intercept_errors", ["off"]) == ["off"], "the app's errors pass"


def test_nginx_body_cap_is_above_the_apps() -> None:
    """nginx accepts bodies past the app's MAX_BODY_BYTES, so the app's own 413 is what callers
    normally see."""
    from app.config import Settings

    cap = _block(_nginx(), "server")["client_max_body_size"][0]
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    size = int(cap[:-1]) * units[cap[-1].lower()] if cap[-1].isalpha() else int(cap)
    assert size > Settings.model_fields["max_body_bytes"].default


def test_nginx_errors_are_json() -> None:
    """nginx's own 502, 504 and 413 answer in the API's JSON shape."""
    config = _nginx()
    server = [
        args for context, name, args in config if context == ("server",) and name == "error_page"
    ]
    handled = {code for args in server for code in args[:-1]}
    assert {"502", "504", "413"} <= handled, server
    for args in server:
        named = _block(config, "server", f"location {args[-1]}")
        assert named["default_type"] == ["application/json"]
        body = json.loads(named["return"][1].encode().decode("unicode_escape"))
        assert isinstance(body["detail"], str)


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


def _torch_index_default(dockerfile: list[tuple[str, str]]) -> str:
    """The default of the Dockerfile's TORCH_INDEX build argument."""
    defaults = [
        args.split("=", 1)[1].strip()
        for keyword, args in dockerfile
        if keyword == "ARG" and args.startswith("TORCH_INDEX=")
    ]
    assert len(defaults) == 1, "the Dockerfile declares no single ARG TORCH_INDEX=<default>"
    return defaults[0]


def test_dockerfile_installs_cpu_torch_first(dockerfile: list[tuple[str, str]]) -> None:
    """Torch is pyproject's pin, from the CPU index unless TORCH_INDEX says otherwise,
    installed before the project itself."""
    assert _torch_index_default(dockerfile) == TORCH_CPU_INDEX
    runs = [args for keyword, args in dockerfile if keyword == "RUN"]
    pin = f"torch=={_torch_pin()}"
    torch_runs = [
        i for i, args in enumerate(runs) if pin in args and '--index-url "${TORCH_INDEX}"' in args
    ]
    assert torch_runs, f"no RUN installs {pin} from ${{TORCH_INDEX}}"
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
# docker-compose.gpu.yml: the worker on a GPU


@pytest.fixture(scope="module")
def gpu_services() -> dict[str, dict[str, Any]]:
    """The `services` of docker-compose.gpu.yml."""
    data = yaml.safe_load(GPU_COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data["services"]


def test_gpu_file_changes_only_the_worker(
    services: dict[str, dict[str, Any]], gpu_services: dict[str, dict[str, Any]]
) -> None:
    """The override touches the worker alone, under an image name of its own (were it
    feedback-lm:latest, the api would run the CUDA image too), built from the same Dockerfile."""
    assert set(gpu_services) == {"worker"}
    worker = gpu_services["worker"]
    assert set(worker) <= {"build", "image", "deploy"}, set(worker)
    assert worker["image"] != services["api"]["image"]
    build = worker["build"]
    assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_gpu_worker_reserves_a_gpu(gpu_services: dict[str, dict[str, Any]]) -> None:
    """The worker gets an NVIDIA GPU (compose's device reservation)."""
    devices = gpu_services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_gpu_worker_installs_cuda_torch(gpu_services: dict[str, dict[str, Any]]) -> None:
    """The GPU worker's TORCH_INDEX is PyPI's (its Linux torch wheel is the CUDA build), not a
    CPU index."""
    index = gpu_services["worker"]["build"]["args"]["TORCH_INDEX"]
    assert index.rstrip("/") == "https://pypi.org/simple"
    assert index != TORCH_CPU_INDEX


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


def _run_compose_config(
    cli: list[str], env: dict[str, str], *files: Path
) -> subprocess.CompletedProcess[str]:
    chosen = [arg for file in (COMPOSE_FILE, *files) for arg in ("-f", str(file))]
    return subprocess.run(
        [*cli, "--env-file", os.devnull, *chosen, "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_config_validates() -> None:
    """`docker compose config` accepts the file (alone and with the GPU override), and refuses
    it without the secrets."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the `docker compose` plugin nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "ADMIN_API_KEY")}
    complete = _run_compose_config(
        cli, {**env, "POSTGRES_PASSWORD": "test-password", "ADMIN_API_KEY": "x" * 32}
    )
    assert complete.returncode == 0, complete.stderr
    with_gpu = _run_compose_config(
        cli, {**env, "POSTGRES_PASSWORD": "test-password", "ADMIN_API_KEY": "x" * 32},
        GPU_COMPOSE_FILE,
    )  # fmt: skip
    assert with_gpu.returncode == 0, with_gpu.stderr
    missing = _run_compose_config(cli, env)
    assert missing.returncode != 0, "compose accepted the file without POSTGRES_PASSWORD"
