"""Load benchmark: many clients at once, each with its own user key, mixing generation, ratings,
comparisons and reads against one API process on the real default model.

Each client loops for the whole run: generates (16 new tokens; the same prompt twice with two
seeds now and then, so that it can compare the two answers), rates answers it got (thumbs and
stars), compares pairs, and reads (GET /v1/generations, /v1/models, /v1/stats/versions). Prints,
per endpoint, requests, status classes and p50/p99 latency; then checks that no answer was a 5xx
(429s, from the bounded generation queue or a rate limit, are allowed and counted) and that
every acknowledged rating and comparison is in the database with the acknowledged values. Exits
1 when a check fails.

    .venv/bin/python bench/load.py                               # PostgreSQL + Redis, 64 x 60 s
    .venv/bin/python bench/load.py --clients 16 --duration 20 --sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from common import (  # bench/, beside this script
    DEFAULT_MODEL,
    ROOT,
    prepared_model,
    start_api,
    stop,
    user_keys,
)

sys.path.insert(0, str(ROOT))

from sqlalchemy import select

from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.models import Comparison, Feedback

ADMIN = "bench-admin-key-0123456789"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PROMPTS = [
    "Write one sentence about the sea.",
    "Name a fruit and its colour.",
    "Give a tip for sleeping well.",
    "Describe a cat in a few words.",
    "What is a good name for a dog?",
    "Say something kind.",
]
READS = ["/v1/generations?limit=20", "/v1/models", "/v1/stats/versions"]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0-1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Results:
    """What every client saw: latencies and statuses per endpoint, and what was acknowledged."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: list[str] = field(default_factory=list)
    ratings: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    comparisons: dict[tuple[int, int, int], tuple[int, int, str]] = field(default_factory=dict)

    def record(self, endpoint: str, started: float, response: httpx.Response | None) -> None:
        """One request's latency and status class (`error` when no answer came)."""
        self.latencies[endpoint].append(time.perf_counter() - started)
        if response is None:
            self.statuses[endpoint]["error"] += 1
            return
        code = response.status_code
        self.statuses[endpoint]["429" if code == 429 else f"{code // 100}xx"] += 1
        if code >= 500:
            self.server_errors.append(f"{endpoint} {code} {response.text[:300]}")


async def call(
    client: httpx.AsyncClient, results: Results, endpoint: str, method: str, url: str,
    body: dict[str, object] | None = None,
) -> httpx.Response | None:  # fmt: skip
    """One request, recorded; None when it got no answer."""
    started = time.perf_counter()
    try:
        response = await client.request(method, url, json=body)
    except httpx.HTTPError as exc:
        results.record(endpoint, started, None)
        results.server_errors.append(f"{endpoint} no answer: {exc!r}")
        return None
    results.record(endpoint, started, response)
    return response


async def client_loop(
    base: str, key: str, key_id: int, deadline: float, results: Results, seed: int
) -> None:
    """One client: its own key, a random mix of requests until the deadline."""
    rng = random.Random(seed)
    unrated: list[int] = []
    pairs: list[tuple[int, int]] = []
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as client:
        while time.monotonic() < deadline:
            choice = rng.random()
            if choice < 0.35:
                prompt, first = rng.choice(PROMPTS), rng.randrange(2**31)
                ids = []
                for sample in range(first, first + (2 if rng.random() < 0.3 else 1)):
                    body = {"prompt": prompt, "max_new_tokens": 16, "seed": sample}
                    response = await call(client, results, "POST /v1/generate", "POST",
                                          "/v1/generate", body)  # fmt: skip
                    if response is not None and response.status_code == 200:
                        ids.append(response.json()["id"])
                unrated += ids
                if len(ids) == 2:
                    pairs.append((ids[0], ids[1]))
            elif choice < 0.6 and unrated:
                generation_id = unrated.pop(rng.randrange(len(unrated)))
                thumbs, stars = rng.choice(["up", "down"]), rng.randint(1, 5)
                body = {"generation_id": generation_id, "thumbs": thumbs, "stars": stars}
                response = await call(client, results, "POST /v1/feedback", "POST",
                                      "/v1/feedback", body)  # fmt: skip
                if response is not None and response.is_success:
                    results.ratings[(key_id, generation_id)] = (thumbs, stars)
            elif choice < 0.7 and pairs:
                a, b = pairs.pop()
                winner = rng.choice(["a", "b", "tie"])
                body = {"generation_a": a, "generation_b": b, "winner": winner}
                response = await call(client, results, "POST /v1/comparisons", "POST",
                                      "/v1/comparisons", body)  # fmt: skip
                if response is not None and response.is_success:
                    results.comparisons[(key_id, min(a, b), max(a, b))] = (a, b, winner)
            else:
                url = rng.choice(READS)
                await call(client, results, f"GET {url.split('?')[0]}", "GET", url)


async def run_clients(base: str, keys: list[tuple[str, int]], seconds: float) -> Results:
    """All clients at once for `seconds`."""
    results = Results()
    deadline = time.monotonic() + seconds
    await asyncio.gather(
        *(
            client_loop(base, key, key_id, deadline, results, seed=i)
            for i, (key, key_id) in enumerate(keys)
        )
    )
    return results


def check_stored(database_url: str, results: Results) -> list[str]:
    """Acknowledged ratings and comparisons missing from the database or stored differently."""
    engine = make_engine(database_url)
    problems = []
    with make_sessionmaker(engine)() as session:
        stored = {
            (row.api_key_id, row.generation_id): (
                row.thumbs.value if row.thumbs else None,
                row.stars,
            )
            for row in session.scalars(select(Feedback))
        }
        compared = {
            (row.api_key_id, row.low_generation_id, row.high_generation_id): (
                row.generation_a_id, row.generation_b_id, row.winner.value,
            )
            for row in session.scalars(select(Comparison))
        }  # fmt: skip
    engine.dispose()
    for item, values in results.ratings.items():
        if stored.get(item) != values:
            problems.append(f"rating {item}: acknowledged {values}, stored {stored.get(item)}")
    for item, values in results.comparisons.items():
        if compared.get(item) != values:
            problems.append(
                f"comparison {item}: acknowledged {values}, stored {compared.get(item)}"
            )
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60, help="seconds of load")
    parser.add_argument("--sqlite", action="store_true", help="SQLite, no Redis")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13", help="with PostgreSQL")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--port", type=int, default=8710)
    args = parser.parse_args()
    model_dir = prepared_model(args.model)

    data_dir = Path(tempfile.mkdtemp(prefix="flm-load-"))
    database = None
    if args.sqlite:
        database_url, redis_url = f"sqlite:///{data_dir / 'load.db'}", ""
    else:
        database = f"flm_load_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
        redis_url = args.redis
    upgrade(database_url)
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": database_url,
           "REDIS_URL": redis_url, "MODEL": str(model_dir), "ADMIN_API_KEY": ADMIN,
           "LOG_LEVEL": "WARNING"}  # fmt: skip
    base = f"http://127.0.0.1:{args.port}"
    server = start_api(env, args.port)
    try:
        keys = user_keys(base, ADMIN, args.clients, "load")
        started = time.perf_counter()
        results = asyncio.run(run_clients(base, keys, args.duration))
        elapsed = time.perf_counter() - started
        problems = check_stored(database_url, results)
    finally:
        stop(server)
        if database is not None:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    store = "SQLite" if args.sqlite else "PostgreSQL + Redis"
    total = sum(len(v) for v in results.latencies.values())
    print(f"\n{args.clients} clients for {elapsed:.0f} s on {store}, model {model_dir.name}")
    print(f"{'endpoint':26} {'requests':>8} {'2xx':>6} {'429':>5} {'4xx':>5} {'5xx':>5} "
          f"{'none':>5} {'p50 ms':>8} {'p99 ms':>8}")  # fmt: skip
    for endpoint in sorted(results.latencies):
        counts, values = results.statuses[endpoint], results.latencies[endpoint]
        print(
            f"{endpoint:26} {len(values):8} {counts['2xx']:6} {counts['429']:5} "
            f"{counts['4xx']:5} {counts['5xx']:5} {counts['error']:5} "
            f"{percentile(values, 0.5) * 1000:8.0f} {percentile(values, 0.99) * 1000:8.0f}"
        )
    statuses = Counter[str]()
    for counts in results.statuses.values():
        statuses.update(counts)
    print(f"\n{total} requests ({total / elapsed:.1f}/s); 429: {statuses['429']}; "
          f"5xx or no answer: {len(results.server_errors)}")  # fmt: skip
    print(f"acknowledged: {len(results.ratings)} ratings, {len(results.comparisons)} comparisons; "
          f"missing or different in the database: {len(problems)}")  # fmt: skip
    for line in (results.server_errors + problems)[:20]:
        print(f"  {line}")
    sys.exit(1 if results.server_errors or problems else 0)


if __name__ == "__main__":
    main()
