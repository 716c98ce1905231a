"""Hot-swap benchmark: steady requests to two API processes through 10 new versions, then rollbacks.

Prints failed requests (target 0) and, per swap, the time from activation to every process
serving the version (target under 2 s for an adapter). Each new version is a LoRA adapter shaped
like a round's (rank 16 on every linear layer of a block) with random weights; the rollbacks go
back and forth between the last two. Runs against the real default model
(prepared by `make run` or `python -m app.cli setup`) unless MODEL points elsewhere.

    .venv/bin/python bench/swap.py                     # PostgreSQL + Redis on this machine
    .venv/bin/python bench/swap.py --no-redis          # database polling only (SQLite)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
from common import DEFAULT_MODEL, ROOT, prepared_model, wait_ready  # bench/, beside this script

sys.path.insert(0, str(ROOT))

from app.db import make_engine, make_sessionmaker
from app.engine.checkpoints import write_checkpoint
from app.migrate import upgrade
from app.models import ModelVersion, VersionKind, VersionStatus
from app.services.versions import next_name

ADMIN = "bench-admin-key-0123456789"


def make_adapters(model_dir: Path):  # type: ignore[no-untyped-def]
    """A LoRA model shaped like a round's (TrainConfig defaults), to fill with random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.training_config import TrainConfig

    train = TrainConfig()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=train.lora_r, lora_alpha=train.lora_alpha, target_modules=list(train.target_modules)
    )
    return get_peft_model(base, config)


def publish(sessions, versions_dir: Path, model: str, seed: int, adapter) -> str:  # type: ignore[no-untyped-def]
    """Write an adapter version with random weights and its row: what a round publishes."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_" in name:
                parameter.normal_(std=0.02)
    with sessions() as session:
        name = next_name(session)
        base = session.query(ModelVersion).filter_by(kind=VersionKind.base).one()
        path = write_checkpoint(
            versions_dir, name, lambda d: adapter.save_pretrained(str(d)),
            {"name": name, "kind": "adapter", "parent": base.name, "base_model": model},
        )  # fmt: skip
        session.add(ModelVersion(
            name=name, kind=VersionKind.adapter, base_model=model, path=str(path),
            parent_id=base.id, status=VersionStatus.candidate, manifest={"parent": base.name},
        ))  # fmt: skip
        session.commit()
    return name


def summary(label: str, latencies: list[float]) -> str:
    """p50 and max of a list of seconds."""
    return (
        f"{label}: {len(latencies)} swaps, p50 {statistics.median(latencies):.2f} s, "
        f"max {max(latencies):.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-redis", action="store_true", help="SQLite and polling only")
    parser.add_argument("--swaps", type=int, default=10, help="new versions, each activated once")
    parser.add_argument("--rollbacks", type=int, default=4, help="then back and forth")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="concurrent request loops")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    model_dir = prepared_model(args.model)

    data_dir = Path(tempfile.mkdtemp(prefix="flm-swap-"))
    if args.no_redis:
        database_url, redis_url = f"sqlite:///{data_dir / 'bench.db'}", ""
    else:
        name = f"flm_swap_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(
            "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        database_url, redis_url = (
            f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
            "redis://127.0.0.1:6379/14",
        )
    upgrade(database_url)
    poll = "0.25" if args.no_redis else "30"
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": database_url,
           "REDIS_URL": redis_url, "MODEL": str(model_dir), "ADMIN_API_KEY": ADMIN,
           "SWAP_POLL_INTERVAL": poll}  # fmt: skip
    ports = [8700 + i for i in range(args.processes)]
    servers = [
        subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                          "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
        for port in ports
    ]  # fmt: skip
    headers = {"Authorization": f"Bearer {ADMIN}"}
    try:
        for port, server in zip(ports, servers, strict=True):
            wait_ready(f"http://127.0.0.1:{port}/readyz", server, 180)
        sessions = make_sessionmaker(make_engine(database_url))
        adapter = make_adapters(model_dir)
        names = [
            publish(sessions, data_dir / "versions", str(model_dir), seed, adapter)
            for seed in range(1, args.swaps + 1)
        ]
        del adapter
        # Each new version once (what a round does), then rollbacks to the one before.
        plan = [(name, "new") for name in names]
        plan += [
            (names[-2] if i % 2 == 0 else names[-1], "rollback") for i in range(args.rollbacks)
        ]

        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}
        failures: list[str] = []
        lock = threading.Lock()

        def load(index: int) -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    port = ports[index % len(ports)]
                    body = {"prompt": "Say something short.", "max_new_tokens": 8}
                    try:
                        response = client.post(
                            f"http://127.0.0.1:{port}/v1/generate", json=body, headers=headers
                        )
                        ok = response.status_code == 200
                        detail = f"{response.status_code} {response.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, detail = False, repr(exc)
                    with lock:
                        counts["ok" if ok else "failed"] += 1
                        if not ok:
                            failures.append(detail)

        threads = [
            threading.Thread(target=load, args=(i,), daemon=True) for i in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        latencies: dict[str, list[float]] = {"new": [], "rollback": []}
        for swap, (target, kind) in enumerate(plan):
            started = time.perf_counter()
            response = httpx.post(
                f"http://127.0.0.1:{ports[0]}/v1/models/{target}/activate",
                headers=headers,
                timeout=60,
            )
            response.raise_for_status()
            pending = set(ports)
            while pending:
                for port in list(pending):
                    if (
                        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json().get("model")
                        == target
                    ):
                        pending.discard(port)
                time.sleep(0.02)
            latencies[kind].append(time.perf_counter() - started)
            print(
                f"swap {swap + 1:2d} -> {target} ({kind}): "
                f"every process serving it after {latencies[kind][-1]:.2f} s",
                flush=True,
            )
            time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        mode = "database polling (0.25 s), SQLite" if args.no_redis else "Redis pub/sub, PostgreSQL"
        print(f"\nmode: {mode}; {args.processes} API processes; {args.clients} clients")
        print(f"requests: {counts['ok']} ok, {counts['failed']} failed")
        for detail in failures[:5]:
            print(f"  failure: {detail}")
        print("activation -> every process serving it")
        for kind, values in latencies.items():
            if values:
                print("  " + summary(kind, values))
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
