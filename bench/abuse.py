"""Abuse benchmark: one key sends maximal prompts as fast as it may while other keys chat.

Starts one API process on the real default model (SQLite), then measures the chatting keys'
time between tokens and time to first token twice: with the server otherwise idle, and while one
more key sends prompts as long as MAX_PROMPT_CHARS allows with max_tokens 1024, keeping
--abuser-concurrency requests open (the engine's cap per key answers 429 beyond its own).
Prints, for both phases, the others' TBT and TTFT percentiles, the abuser's answers by status,
the API process's resident memory (current and peak), and the engine's KV-cache bytes; exits 1
if any answer was a 5xx.

    .venv/bin/python bench/abuse.py                      # 8 chatting keys, 40 s a phase
    .venv/bin/python bench/abuse.py --clients 4 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import (  # bench/, beside this script
    DEFAULT_MODEL,
    ROOT,
    prepared_model,
    start_api,
    stop,
    user_keys,
)

sys.path.insert(0, str(ROOT))

from app.migrate import upgrade

ADMIN = "bench-admin-key-0123456789"
WORDS = [
    "river",
    "stone",
    "light",
    "window",
    "garden",
    "paper",
    "music",
    "silver",
    "orange",
    "market",
    "winter",
    "station",
    "cloud",
    "harbour",
    "letter",
    "forest",
    "engine",
    "candle",
    "bridge",
    "mirror",
    "valley",
    "pocket",
    "thunder",
    "meadow",
    "lantern",
]


@dataclass
class Phase:
    """What one phase measured."""

    gaps: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    abuser: Counter[str] = field(default_factory=Counter)
    abuser_tokens: list[int] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0-1) of values, nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def status_class(code: int) -> str:
    return "429" if code == 429 else f"{code // 100}xx"


async def chat(client: httpx.AsyncClient, key: str, until: float, phase: Phase) -> None:
    """One person chatting: streamed answers of 64 tokens, one after another."""
    rng = random.Random(key)
    headers = {"Authorization": f"Bearer {key}"}
    while time.perf_counter() < until:
        body = {
            "model": "default",
            "stream": True,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": f"Tell me about the {rng.choice(WORDS)}."}],
        }
        started = time.perf_counter()
        last = None
        try:
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as response:
                phase.statuses[status_class(response.status_code)] += 1
                if response.status_code != 200:
                    await response.aread()
                    await asyncio.sleep(0.5)
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:]).get("choices") or [{}]
                    if not choice[0].get("delta", {}).get("content"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        phase.first.append(now - started)
                    else:
                        phase.gaps.append(now - last)
                    last = now
        except httpx.HTTPError:
            phase.statuses["no answer"] += 1


async def abuse(client: httpx.AsyncClient, key: str, until: float, phase: Phase, text: str) -> None:
    """One request at a time of the abusing key's: the longest prompt, the most tokens."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "default", "max_tokens": 1024, "messages": [{"role": "user", "content": text}]}
    while time.perf_counter() < until:
        try:
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
        except httpx.HTTPError:
            phase.abuser["no answer"] += 1
            continue
        phase.abuser[status_class(response.status_code)] += 1
        if response.status_code == 200:
            phase.abuser_tokens.append(response.json()["usage"]["prompt_tokens"])
        elif response.status_code == 429:
            await asyncio.sleep(0.05)


def memory(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of a process, in GiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    kib = lambda name: int(fields[name].split()[0]) / 2**20  # noqa: E731
    return kib("VmRSS"), kib("VmHWM")


async def run_phase(
    base: str, keys: list[str], abuser: str | None, seconds: float, args: argparse.Namespace
) -> Phase:
    phase = Phase()
    until = time.perf_counter() + seconds
    text = " ".join(random.Random(0).choice(WORDS) for _ in range(args.max_chars // 7))
    text = text[: args.max_chars]
    limits = httpx.Limits(max_connections=len(keys) + args.abuser_concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        tasks = [chat(client, key, until, phase) for key in keys]
        if abuser is not None:
            tasks += [
                abuse(client, abuser, until, phase, text) for _ in range(args.abuser_concurrency)
            ]
        await asyncio.gather(*tasks)
    return phase


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8, help="keys chatting normally")
    parser.add_argument("--duration", type=float, default=40, help="seconds a phase")
    parser.add_argument("--abuser-concurrency", type=int, default=16)
    parser.add_argument("--max-chars", type=int, default=16_000, help="MAX_PROMPT_CHARS")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--port", type=int, default=8712)
    args = parser.parse_args()
    model_dir = prepared_model(args.model)

    data_dir = Path(tempfile.mkdtemp(prefix="flm-abuse-"))
    database_url = f"sqlite:///{data_dir / 'abuse.db'}"
    upgrade(database_url)
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": database_url,
           "REDIS_URL": "", "MODEL": str(model_dir), "ADMIN_API_KEY": ADMIN,
           "LOG_LEVEL": "WARNING", "RATE_LIMIT_GENERATION": "none",
           "MAX_PROMPT_CHARS": str(args.max_chars)}  # fmt: skip
    base = f"http://127.0.0.1:{args.port}"
    server = start_api(env, args.port)
    try:
        keys = [key for key, _ in user_keys(base, ADMIN, args.clients + 1, "abuse")]
        *chatting, abuser = keys
        asyncio.run(run_phase(base, chatting, None, 5, args))  # warm-up, not counted
        idle = asyncio.run(run_phase(base, chatting, None, args.duration, args))
        idle_memory = memory(server.pid)
        abused = asyncio.run(run_phase(base, chatting, abuser, args.duration, args))
        abused_memory = memory(server.pid)
    finally:
        stop(server)

    print(f"\n{args.clients} chatting keys, {args.duration:.0f} s a phase, model {model_dir.name}")
    print(f"{'phase':8} {'TBT p50':>8} {'TBT p99':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'answers':>8} {'RSS GiB':>8} {'peak GiB':>9}")  # fmt: skip
    for name, phase, (rss, peak) in (
        ("idle", idle, idle_memory),
        ("abused", abused, abused_memory),
    ):
        print(
            f"{name:8} {percentile(phase.gaps, 0.5) * 1000:7.1f}ms "
            f"{percentile(phase.gaps, 0.99) * 1000:7.1f}ms "
            f"{percentile(phase.first, 0.5) * 1000:8.0f}ms "
            f"{percentile(phase.first, 0.99) * 1000:8.0f}ms "
            f"{sum(phase.statuses.values()):8} {rss:8.2f} {peak:9.2f}"
        )
    ratio = percentile(abused.gaps, 0.99) / percentile(idle.gaps, 0.99)
    tokens = sorted(abused.abuser_tokens)
    print(f"\nothers' TBT p99 abused / idle: {ratio:.2f}")
    print(f"others' answers by status: {dict(idle.statuses + abused.statuses)}")
    print(f"abuser's answers by status: {dict(abused.abuser)}; prompt tokens of those answered: "
          f"{tokens[0] if tokens else '-'}-{tokens[-1] if tokens else '-'}")  # fmt: skip
    server_errors = sum(
        counts.get("5xx", 0) + counts.get("no answer", 0)
        for counts in (idle.statuses, abused.statuses, abused.abuser)
    )
    print(f"5xx or no answer: {server_errors}")
    sys.exit(1 if server_errors else 0)


if __name__ == "__main__":
    main()
