"""The proxy of `docker compose up --scale api=N`, for real: Debian's nginx running
deploy/nginx/default.conf in front of three API processes on PostgreSQL and Redis.

Docker cannot run here, so the test stands in for the two things compose provides: each replica
listens on its own loopback address (127.0.0.2, .3, .4) on one port, as containers do on their
network, and a small DNS server answers a name with the replicas' addresses, as Docker's
embedded DNS answers `api`. The configuration is the deploy file itself with only its resolver,
upstream name and listening port changed; the replicas run the api service's command from
docker-compose.yml with only its host and port changed.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.models import ModelVersion, VersionKind, VersionStatus
from tests.helpers import (
    ADMIN_KEY,
    REDIS_TEST_URL,
    api_ready,
    free_port,
    reset_database,
    stop_process,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONFIG = ROOT / "deploy" / "nginx" / "default.conf"
COMPOSE_FILE = ROOT / "docker-compose.yml"
NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(path).is_file()), None
)
pytestmark = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (Debian's package `nginx`; `make test` installs it)",
)

REPLICA_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
STARTING = ("127.0.0.5", "127.0.0.6", "127.0.0.7")
"""Replicas that are still starting: they have an address (Docker's DNS lists a container as soon
as it runs), but their uvicorn opens the port only once the app is ready. Three, so that half of
all requests meet one first."""
DOMAIN = "flm.test"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
READ_LIMIT = 30
"""RATE_LIMIT_READ of the replicas, per minute: small enough to count to."""


# ---------------------------------------------------------------------------------------------
# what compose would provide: a DNS that lists the replicas, and the replicas themselves


class ReplicaDns:
    """A DNS server on 127.0.0.1 answering A queries for the names in `records` with their
    addresses, as Docker's embedded DNS answers a service name with its containers' addresses
    (other names: NXDOMAIN). Change `records` to add or remove replicas."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:  # closed
                return
            try:
                reply = self._answer(query)
            except (IndexError, struct.error, UnicodeDecodeError):  # not a query we understand
                continue
            self.sock.sendto(reply, peer)

    def _answer(self, query: bytes) -> bytes:
        ident, flags = struct.unpack("!HH", query[:4])
        labels, offset = [], 12
        while length := query[offset]:
            labels.append(query[offset + 1 : offset + 1 + length].decode("ascii").lower())
            offset += 1 + length
        qtype = struct.unpack("!H", query[offset + 1 : offset + 3])[0]
        question = query[12 : offset + 5]
        addresses = self.records.get(".".join(labels))
        answers = (addresses or []) if qtype == 1 else []  # A; no AAAA (nginx: ipv6=off)
        rcode = 0 if addresses is not None else 3
        # QR, AA, RA; RD copied from the query.
        header = struct.pack(
            "!HHHHHH", ident, 0x8480 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0
        )
        records = b"".join(
            b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 1, 4) + socket.inet_aton(address)
            for address in answers
        )
        return header + question + records

    def close(self) -> None:
        self.sock.close()


class DatabaseLink:
    """A TCP relay between one replica and PostgreSQL: `cut()` breaks that replica's way to the
    database (its connections dropped, new ones refused) while the others keep theirs, until
    `mend()`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if not self._up.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._sockets.discard(source)
            source.close()

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def mend(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def api_command(host: str, port: int) -> list[str]:
    """The api service's command in docker-compose.yml, listening on `host:port`."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    tokens = [str(token) for token in compose["services"]["api"]["command"]]
    assert tokens[0] == "uvicorn", tokens
    for option, value in (("--host", host), ("--port", str(port))):
        tokens[tokens.index(option) + 1] = value
    return [sys.executable, "-m", *tokens]


@dataclass
class Replica:
    """One API process, as one api container."""

    host: str
    port: int
    env: dict[str, str]
    log: Path
    cwd: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            api_command(self.host, self.port), env=self.env, cwd=self.cwd,
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 180) -> None:
        def ready() -> bool:
            process = self.process
            if process is None or process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"replica {self.address} exited:\n{tail}")
            return api_ready(self.url)

        wait_until(ready, timeout, f"replica {self.address} to be ready", every=0.2)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def serving(self) -> str | None:
        """The version this replica serves, asked directly (not through the proxy)."""
        try:
            return str(httpx.get(f"{self.url}/readyz", timeout=5).json().get("model"))
        except (httpx.HTTPError, ValueError):
            return None


def replica_environment(settings: dict[str, str]) -> dict[str, str]:
    """The environment of a replica: the caller's, without any setting of the service (a
    developer's MODEL or RATE_LIMIT_* must not change what is tested), plus `settings`."""
    names = {name.upper() for name in Settings.model_fields}
    return {**{k: v for k, v in os.environ.items() if k not in names}, **settings}


# ---------------------------------------------------------------------------------------------
# the proxy


def render(config: str, *, resolver: str, upstream: str, listen: str) -> str:
    """deploy/nginx/default.conf with its resolver, upstream and port changed, nothing else."""
    for old, new in (
        ("resolver 127.0.0.11 ", f"resolver {resolver} "),
        ("set $api_upstream api:8000;", f"set $api_upstream {upstream};"),
        ("listen 8000;", f"listen {listen};"),
    ):
        assert config.count(old) == 1, f"{NGINX_CONFIG.name} should hold {old!r} exactly once"
        config = config.replace(old, new)
    return config


# Around the deploy file, what the official image's nginx.conf gives it (it is included inside
# `http { }`), with this test's paths: nginx runs unprivileged in the foreground, logging which
# replica answered each request.
MAIN_CONFIG = """\
daemon off;
user {user};
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 65;
    log_format replicas '$request_uri|$status|$upstream_addr|$upstream_status';
    access_log {dir}/access.log replicas;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/default.conf;
}}
"""


@dataclass
class Passage:
    """One request as the proxy logged it: its status, and each replica it tried in order."""

    uri: str
    status: int
    tried: list[str]
    answers: list[str]

    @property
    def served_by(self) -> str:
        return self.tried[-1] if self.tried else ""


@dataclass
class Proxy:
    """Debian's nginx on a free port, running the deploy file for the DNS name `name`."""

    directory: Path
    dns: ReplicaDns
    name: str
    upstream_port: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert NGINX is not None
        self.directory.mkdir(parents=True)
        (self.directory / "default.conf").write_text(
            render(
                NGINX_CONFIG.read_text(encoding="utf-8"),
                resolver=f"127.0.0.1:{self.dns.port}",
                upstream=f"{self.name}:{self.upstream_port}",
                listen=f"127.0.0.1:{self.port}",
            )
        )
        main = self.directory / "nginx.conf"
        main.write_text(MAIN_CONFIG.format(dir=self.directory, user=getpass.getuser()))
        command = [NGINX, "-p", str(self.directory), "-c", str(main), "-e", "stderr"]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
        assert check.returncode == 0, f"nginx refuses the configuration:\n{check.stderr}"
        log = (self.directory / "nginx.out").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert self.process is not None and self.process.poll() is None, "nginx exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, 20, "nginx to listen", every=0.05)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def passages(self, tag: str, count: int) -> list[Passage]:
        """The `count` logged requests whose URI carries `tag` (nginx logs a request just after
        answering it, so this waits for the last ones)."""

        def logged() -> list[Passage] | None:
            found = []
            for line in (self.directory / "access.log").read_text().splitlines():
                uri, status, tried, answers = line.split("|")
                if tag in uri:
                    found.append(
                        Passage(
                            uri, int(status),
                            [a.strip() for a in re.split(r"[,:]\s", tried) if a.strip() != "-"],
                            [a.strip() for a in re.split(r"[,:]\s", answers) if a.strip()],
                        )
                    )  # fmt: skip
            return found if len(found) >= count else None

        found = wait_until(logged, 10, f"{count} logged requests tagged {tag}", every=0.05)
        assert isinstance(found, list)
        return found


# ---------------------------------------------------------------------------------------------
# fixtures


@dataclass
class Deployment:
    """What `docker compose up --scale api=3` runs: the replicas, their DNS name, the proxy."""

    dns: ReplicaDns
    replicas: list[Replica]
    proxy: Proxy
    data_dir: Path
    tmp: Path
    database_url: str
    link: DatabaseLink
    extra: list[Proxy] = field(default_factory=list)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.proxy.url, timeout=60, **kwargs)

    def new_key(self, role: str = "user") -> dict[str, str]:
        """A fresh API key (each has its own rate limits)."""
        with self.client() as client:
            response = client.post("/v1/keys", json={"name": "proxy", "role": role}, headers=ADMIN)
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['key']}"}

    def another_proxy(self, name: str, addresses: list[str]) -> Proxy:
        """A second proxy on the same deploy file, for a DNS name listing `addresses`."""
        self.dns.records[f"{name}.{DOMAIN}"] = addresses
        proxy = Proxy(
            self.tmp / f"nginx-{name}", self.dns, f"{name}.{DOMAIN}", self.replicas[0].port
        )
        self.extra.append(proxy)
        proxy.start()
        return proxy


def _common_port() -> int:
    """A port free on every replica address (and on the one that stays closed)."""
    for _ in range(50):
        port = free_port()
        try:
            for host in (*REPLICA_HOSTS, *STARTING):
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every replica address")


@pytest.fixture(scope="module")
def deployment(
    pg_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Three replicas on one PostgreSQL (the third through a DatabaseLink), one Redis and one
    data directory, listed by the DNS as `api.flm.test`, behind the proxy."""
    tmp = tmp_path_factory.mktemp("proxy")
    data_dir = tmp / "data"
    data_dir.mkdir()
    reset_database(pg_url)
    url = make_url(pg_url)
    link = DatabaseLink((url.host or "127.0.0.1", url.port or 5432))
    port = _common_port()
    dns = ReplicaDns()
    name = f"api.{DOMAIN}"
    dns.records[name] = list(REPLICA_HOSTS)
    replicas = []
    for index, host in enumerate(REPLICA_HOSTS):
        database = pg_url
        if index == len(REPLICA_HOSTS) - 1:
            database = url.set(host="127.0.0.1", port=link.port).render_as_string(False)
        env = replica_environment(
            {
                "DATA_DIR": str(data_dir), "DATABASE_URL": database, "REDIS_URL": REDIS_TEST_URL,
                "MODEL": str(tiny_model_dir), "MODEL_DTYPE": "float32",
                "ADMIN_API_KEY": ADMIN_KEY, "RATE_LIMIT_READ": f"{READ_LIMIT}/minute",
                "LOG_LEVEL": "WARNING",
            }
        )  # fmt: skip
        replicas.append(Replica(host, port, env, tmp / f"replica-{index}.log", tmp))
    proxy = Proxy(tmp / "nginx", dns, name, port)
    deployment = Deployment(dns, replicas, proxy, data_dir, tmp, pg_url, link)
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        proxy.start()
        yield deployment
    finally:
        for proxy_process in [proxy, *deployment.extra]:
            proxy_process.stop()
        for replica in replicas:
            replica.stop()
        link.close()
        dns.close()
        reset_database(pg_url)


def tag() -> str:
    return uuid.uuid4().hex[:12]


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": content}], **extra}


# ---------------------------------------------------------------------------------------------
# the tests


def test_replicas_write_nothing_to_the_shared_volume(deployment: Deployment) -> None:
    """Started as the api service is (ADMIN_API_KEY set), a replica writes nothing to the data
    directory, which is why compose can mount it read-only on the api."""
    assert list(deployment.data_dir.iterdir()) == []


def test_requests_are_spread_over_every_replica(deployment: Deployment) -> None:
    """Through the proxy, requests reach all three replicas."""
    mark = tag()
    with deployment.client() as client:
        statuses = [client.get(f"/healthz?t={mark}").status_code for _ in range(30)]
    assert statuses == [200] * 30
    served = {p.served_by for p in deployment.proxy.passages(mark, 30)}
    assert served == {r.address for r in deployment.replicas}, served


def test_a_stream_arrives_event_by_event(deployment: Deployment) -> None:
    """A streamed chat completion comes through as its events are made, in many pieces over
    time, not held back and delivered at the end."""
    headers = deployment.new_key()
    body = chat("Tell me a long story.", stream=True, max_tokens=64, seed=7)
    arrivals: list[tuple[float, bytes]] = []
    with (
        deployment.client() as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers
        assert "content-encoding" not in response.headers
        started = time.monotonic()
        for piece in response.iter_raw():
            arrivals.append((time.monotonic() - started, piece))
    text = b"".join(piece for _, piece in arrivals).decode()
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]", events[-3:]
    deltas = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert sum(1 for d in deltas if d) >= 32, "the tiny model writes up to 64 tokens"
    # Many separate reads, spread over the stream's life: the first events were passed on long
    # before the last were made. A buffering proxy delivers it in one or two pieces at the end.
    first_delta = next(t for t, piece in arrivals if b'"content"' in piece)
    total = arrivals[-1][0]
    assert len(arrivals) >= 10, f"{len(arrivals)} pieces"
    assert first_delta < total / 2, f"first delta at {first_delta:.3f}s of {total:.3f}s"


def test_a_new_version_reaches_every_replica_within_2s(deployment: Deployment) -> None:
    """A version activated through the proxy (on whichever replica) is served by all three within
    2 s: the versions volume and PostgreSQL are all they share."""
    name = publish_adapter(deployment)
    with deployment.client() as client:
        response = client.post(f"/v1/models/{name}/activate", headers=ADMIN)
    assert response.status_code == 200, response.text
    activated = time.monotonic()
    reached: dict[str, float] = {}

    def everywhere() -> bool:
        for replica in deployment.replicas:
            if replica.address not in reached and replica.serving() == name:
                reached[replica.address] = time.monotonic() - activated
        return len(reached) == len(deployment.replicas)

    wait_until(everywhere, 10, f"{name} on every replica", every=0.05)
    assert max(reached.values()) < 2.0, reached


def publish_adapter(deployment: Deployment) -> str:
    """A candidate version with random LoRA weights, written to the shared volume as a round on
    the worker writes one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.engine.checkpoints import write_checkpoint
    from app.services.versions import next_name

    model_dir = deployment.replicas[0].env["MODEL"]
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = get_peft_model(model, config)
    engine = make_engine(deployment.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            name = next_name(session)
            parent = session.query(ModelVersion).filter_by(kind=VersionKind.base).one()
            path = write_checkpoint(
                deployment.data_dir / "versions", name,
                lambda d: adapter.save_pretrained(str(d)),
                {"name": name, "kind": "adapter", "parent": parent.name},
            )  # fmt: skip
            session.add(ModelVersion(
                name=name, kind=VersionKind.adapter, base_model=model_dir, path=str(path),
                parent_id=parent.id, status=VersionStatus.candidate, manifest={},
            ))  # fmt: skip
            session.commit()
    finally:
        engine.dispose()
    return name


def test_rate_limits_are_counted_across_replicas(deployment: Deployment) -> None:
    """One key's reads, spread over three replicas, are refused past RATE_LIMIT_READ in total
    (Redis counts them), not past three times it."""
    headers = deployment.new_key()
    mark = tag()
    with deployment.client() as client:
        statuses = [
            client.get(f"/v1/keys/me?t={mark}", headers=headers).status_code for _ in range(45)
        ]
    assert statuses.count(200) == READ_LIMIT, statuses
    assert statuses.count(429) == 45 - READ_LIMIT, statuses
    passages = deployment.proxy.passages(mark, 45)
    served = {p.served_by for p in passages if p.status == 200}
    assert served == {r.address for r in deployment.replicas}, served


def test_a_replica_that_is_starting_gets_nothing(deployment: Deployment) -> None:
    """A replica whose port is not open yet (uvicorn opens it once the app is ready) is listed
    by the DNS like any other; every request that meets it, POST included, is answered by
    another replica, since nothing was sent."""
    proxy = deployment.another_proxy("starting", [*REPLICA_HOSTS, *STARTING])
    headers = deployment.new_key()
    mark = tag()
    statuses = []
    with httpx.Client(base_url=proxy.url, timeout=60) as client:
        for i in range(20):
            body = chat(f"Hello {i}", max_tokens=1)
            statuses.append(
                client.post(f"/v1/chat/completions?t={mark}", json=body, headers=headers)
            )
            statuses.append(client.get(f"/v1/keys/me?t={mark}", headers=headers))
    assert [r.status_code for r in statuses] == [200] * 40, [r.text for r in statuses][:4]
    passages = proxy.passages(mark, 40)
    starting = {f"{host}:{proxy.upstream_port}" for host in STARTING}
    met = [p for p in passages if starting & set(p.tried)]
    assert met, "no request met a starting replica: the DNS answer was not used"
    assert all(p.served_by not in starting for p in passages)
    assert any(p.uri.startswith("/v1/chat/completions") for p in met), "no POST met one"


def test_a_replica_without_its_database_is_passed_over_for_reads(deployment: Deployment) -> None:
    """A running replica that loses its database answers 503 (/readyz says not ready); reads
    sent to it are passed on and answered by a ready replica, and writes are never sent twice:
    one that met it gets its 503 with Retry-After, to be retried by the client."""
    cut_off = deployment.replicas[-1]
    headers = deployment.new_key()
    deployment.link.cut()
    try:
        wait_until(lambda: not api_ready(cut_off.url), 20, "the replica to be not ready")
        direct = httpx.get(f"{cut_off.url}/v1/keys/me", headers=headers, timeout=10)
        assert direct.status_code == 503, direct.text
        mark = tag()
        with deployment.client() as client:
            reads = [client.get(f"/v1/keys/me?t={mark}", headers=headers) for _ in range(28)]
            writes = [
                client.post(f"/v1/chat/completions?t={mark}", json=chat("Hi", max_tokens=1),
                            headers=headers)
                for _ in range(8)
            ]  # fmt: skip
        assert [r.status_code for r in reads] == [200] * 28, [r.text for r in reads][:3]
        passages = deployment.proxy.passages(mark, 36)
        reads_met = [p for p in passages if p.uri.startswith("/v1/keys") and len(p.tried) > 1]
        assert any(cut_off.address in p.tried[:-1] for p in reads_met), "no read met it"
        for response, passage in zip(writes, passages[28:], strict=True):
            if passage.served_by == cut_off.address:
                assert response.status_code == 503 and response.headers["Retry-After"]
            else:
                assert response.status_code == 200, response.text
            assert len(passage.tried) == 1, "a POST was sent to a second replica"
    finally:
        deployment.link.mend()
    cut_off.wait_ready(30)


def test_restarting_a_replica_under_steady_requests_gives_no_5xx(deployment: Deployment) -> None:
    """Reads and generations keep coming while one replica stops (SIGTERM, as `docker compose
    restart` sends) and starts again: not one 5xx (a replica that is stopping finishes what it
    has and takes nothing new), and the restarted replica serves again afterwards."""
    restarted = deployment.replicas[1]
    per_key = READ_LIMIT - 5
    keys = [deployment.new_key() for _ in range(20)]
    mark = tag()
    answers: list[int] = []
    stop = threading.Event()

    def read() -> None:
        with deployment.client() as client:
            count = 0
            while not stop.is_set() and count < per_key * len(keys):
                headers = keys[count // per_key]
                answers.append(client.get(f"/v1/keys/me?t={mark}", headers=headers).status_code)
                answers.append(client.get(f"/readyz?t={mark}").status_code)
                answers.append(client.get(f"/healthz?t={mark}").status_code)
                count += 1
                time.sleep(0.05)

    writers = [deployment.new_key() for _ in range(4)]
    written: list[int] = []

    def write() -> None:  # 4 keys in turn: well under RATE_LIMIT_GENERATION each
        with deployment.client() as client:
            count = 0
            while not stop.is_set():
                body = chat(f"Hello {count}", max_tokens=2)
                headers = writers[count % len(writers)]
                answer = client.post(f"/v1/chat/completions?t={mark}", json=body, headers=headers)
                written.append(answer.status_code)
                count += 1
                time.sleep(0.1)

    reader, writer = threading.Thread(target=read), threading.Thread(target=write)
    reader.start()
    writer.start()
    try:
        time.sleep(1)
        restarted.stop()
        time.sleep(1)
        restarted.start()
        restarted.wait_ready()
        back, logged_back = len(answers), len(answers) + len(written)
        wait_until(lambda: len(answers) > back + 60, 30, "reads after the restart")
    finally:
        stop.set()
        reader.join(60)
        writer.join(60)
    assert answers and set(answers) == {200}, {s: answers.count(s) for s in set(answers)}
    assert len(written) > 10 and set(written) == {200}, {s: written.count(s) for s in written}
    passages = deployment.proxy.passages(mark, len(answers) + len(written))
    assert restarted.address in {p.served_by for p in passages[logged_back:]}, "not serving again"


def test_replicas_added_are_used_without_restarting_the_proxy(deployment: Deployment) -> None:
    """`--scale api=N` adds containers to the DNS answer; nginx re-resolves the name (valid=10s)
    and sends requests to them, without a reload."""
    first = REPLICA_HOSTS[0]
    proxy = deployment.another_proxy("scale", [first])
    mark = tag()
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert all(client.get(f"/healthz?t={mark}").status_code == 200 for _ in range(5))
        assert {p.served_by for p in proxy.passages(mark, 5)} == {f"{first}:{proxy.upstream_port}"}
        deployment.dns.records[proxy.name] = list(REPLICA_HOSTS)
        added = tag()
        sent = 0

        def all_used() -> bool:
            nonlocal sent
            for _ in range(6):
                assert client.get(f"/healthz?t={added}").status_code == 200
                sent += 1
            served = {p.served_by for p in proxy.passages(added, sent)}
            return len(served) == len(REPLICA_HOSTS)

        wait_until(all_used, 20, "the added replicas to get requests", every=0.5)


def test_with_no_replica_ready_the_proxy_answers_in_json(deployment: Deployment) -> None:
    """When no listed replica accepts the request, the caller gets a JSON 502 with Retry-After
    (not nginx's HTML page), after nginx tried them all."""
    proxy = deployment.another_proxy("none", [STARTING[0]])
    response = httpx.get(f"{proxy.url}/v1/models", timeout=30)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.headers["Retry-After"] == "5"
    assert "no API replica" in response.json()["detail"]


def test_body_limits_are_the_apps(deployment: Deployment) -> None:
    """A body over MAX_BODY_BYTES (1 MiB) reaches the app and gets its JSON 413; past the
    proxy's own cap (2 MiB) nginx refuses it, in JSON too."""
    headers = deployment.new_key()
    with deployment.client() as client:
        over_app = client.post("/v1/chat/completions", content=b"x" * 1_200_000, headers=headers)
        over_proxy = client.post("/v1/chat/completions", content=b"x" * 3_000_000, headers=headers)
    assert over_app.status_code == 413 and over_app.json()["detail"]
    assert over_proxy.status_code == 413
    assert over_proxy.json() == {"detail": "the request body is too large"}
