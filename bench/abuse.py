"""Abuse benchmark: the serving half and the round half of issue 14's figures.

Serving (`--phase serve`): starts one API process on the real default model (SQLite), then
measures the chatting keys' time between tokens and time to first token twice: with the server
otherwise idle, and while one more key sends prompts as long as MAX_PROMPT_CHARS allows with
max_tokens 1024, keeping --abuser-concurrency requests open (the engine's cap per key answers 429
beyond its own) from a process of its own, so that its client work does not delay the reading
of the others' tokens. Prints, for both phases, the others' TBT and TTFT percentiles, the abuser's
answers by status, and the API process's resident memory (current and peak); fails if any
answer was a 5xx, if the others' TBT p99 grew past --max-ratio (2x, issue 14's bound), or if the
API's peak memory went past its idle peak plus KV_CACHE_BYTES (the default, 2 GiB).

Round (`--phase round`): starts the whole `make run` stack (`python -m app.cli run`: API, Celery
worker with the solo pool, beat, on SQLite and the embedded broker) on the real default model
with every other setting at its default, and samples the resident memory of every process in it
four times a second (VmRSS and the kernel's own VmHWM peak; PSS every 2 s). Then, through the
API: --ratings QA generations as long as the API allows (question plus context filled to
MAX_PROMPT_CHARS, the context's mix of words and numbers chosen so that the prompt after the chat
template is as close to MAX_PROMPT_TOKENS as it may be, --max-new-tokens 1024, a question asking
for a long answer), spread over --raters user keys; each rated by its own key with a thumb (up
and down in turn), a correction of exactly the correction cap (TRAINING_MAX_LENGTH -
TRAINING_MAX_PROMPT_TOKENS - 1 tokens) and a 4,000-character comment; one over-long input and
one over-cap correction, which must get a 422. Then one training round on the worker (POST
/v1/training/runs), with the default TokenBudget settings (TRAINING_MAX_LENGTH 512,
TRAINING_MAX_PROMPT_TOKENS 256, TRAINING_BATCH_TOKENS 1024, TRAINING_CHUNK_TOKENS 256), the
default TrainConfig and GateConfig except `epochs` (--epochs, 1 by default where TrainConfig's is
2, to keep the round near ten minutes on a 2-core CPU: steps do not change what one micro-batch
holds, so the peak is the same; --epochs 0 keeps the default). Prints the round's outcome
(published, or rejected by the gate with its reason: both are a success), its duration, the
worker's peak resident memory, and the whole stack's peak against --target-gib (8 GiB, the
issue's bound for the default model); fails if the round failed, the worker died, or the stack's
peak resident memory (the sum of VmRSS over its processes, shared pages counted in each) went
over the target. Should the stack pass --kill-above-gib (12 GiB), the bench kills its largest
process, so that a runaway round fails with its figure instead of taking the machine's memory
from everything else on it (the kernel's OOM killer may pick any process).

On the 2-core AMD EPYC, shared with other work, the 20 generations took about 33 minutes and the
round's KTO phase (2 steps) 202 s.

    .venv/bin/python bench/abuse.py                      # both halves (serving first)
    .venv/bin/python bench/abuse.py --phase serve --clients 4 --duration 20
    .venv/bin/python bench/abuse.py --phase round        # 20 maximal QA ratings, one round
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import (  # bench/, beside this script
    DEFAULT_MODEL,
    ROOT,
    TreeSampler,
    prepared_model,
    start_api,
    stop,
    user_keys,
    wait_ready,
)

sys.path.insert(0, str(ROOT))

from app.config import Settings
from app.migrate import upgrade

KV_CACHE_BYTES: int = Settings.model_fields["kv_cache_bytes"].default
"""The API's KV budget in the serving half: the default."""

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


async def run_phase(base: str, keys: list[str], seconds: float) -> Phase:
    """The chatting keys for `seconds`: their gaps, first tokens and statuses."""
    phase = Phase()
    until = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=len(keys) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await asyncio.gather(*(chat(client, key, until, phase) for key in keys))
    return phase


async def run_abuser(base: str, key: str, seconds: float, concurrency: int, text: str) -> Phase:
    """The abusing key's `concurrency` loops for `seconds`: its answers by status."""
    phase = Phase()
    until = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await asyncio.gather(*(abuse(client, key, until, phase, text) for _ in range(concurrency)))
    return phase


def abuser_process(base: str, key: str, seconds: float, concurrency: int, text: str) -> Phase:
    """run_abuser in a process of its own (multiprocessing's entry point)."""
    return asyncio.run(run_abuser(base, key, seconds, concurrency, text))


def abused_phase(base: str, keys: list[str], abuser: str, args: argparse.Namespace) -> Phase:
    """The chatting keys while the abuser floods from another process, so that the abuser's own
    client work does not delay this process's reading of the others' tokens."""
    text = " ".join(random.Random(0).choice(WORDS) for _ in range(args.max_chars // 7))
    text = text[: args.max_chars]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        flood = pool.apply_async(
            abuser_process, (base, abuser, args.duration, args.abuser_concurrency, text)
        )
        phase = asyncio.run(run_phase(base, keys, args.duration))
        abused = flood.get(timeout=args.duration + 900)
    phase.abuser, phase.abuser_tokens = abused.abuser, abused.abuser_tokens
    return phase


def serve_phase(args: argparse.Namespace) -> bool:
    """One key abusing, 8 chatting: print the figures; True unless a 5xx or no answer, the
    others' TBT p99 grew past --max-ratio, or the API's memory past its budget."""
    model_dir = prepared_model(args.model)
    data_dir = Path(tempfile.mkdtemp(prefix="flm-abuse-"))
    database_url = f"sqlite:///{data_dir / 'abuse.db'}"
    upgrade(database_url)
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": database_url,
           "REDIS_URL": "", "MODEL": str(model_dir), "ADMIN_API_KEY": ADMIN,
           "LOG_LEVEL": "WARNING", "RATE_LIMIT_GENERATION": args.rate_limit,
           "MAX_PROMPT_CHARS": str(args.max_chars),
           "KV_CACHE_BYTES": str(KV_CACHE_BYTES)}  # fmt: skip
    base = f"http://127.0.0.1:{args.port}"
    server = start_api(env, args.port)
    try:
        keys = [key for key, _ in user_keys(base, ADMIN, args.clients + 1, "abuse")]
        *chatting, abuser = keys
        asyncio.run(run_phase(base, chatting, 5))  # warm-up, not counted
        idle = asyncio.run(run_phase(base, chatting, args.duration))
        idle_memory = memory(server.pid)
        abused = abused_phase(base, chatting, abuser, args)
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
    # The process may grow by its KV budget beyond what it held serving the chats alone.
    bound = idle_memory[1] + KV_CACHE_BYTES / 2**30
    print(f"API peak {abused_memory[1]:.2f} GiB against {bound:.2f} (idle peak + KV_CACHE_BYTES)")
    if ratio > args.max_ratio:
        print(f"FAIL: the others' TBT p99 grew {ratio:.2f}x, over {args.max_ratio}x")
    if abused_memory[1] > bound:
        print("FAIL: the API's resident memory went past its budget")
    return not server_errors and ratio <= args.max_ratio and abused_memory[1] <= bound


# The round half.

LONG_ANSWER = (
    "Copy the context above word for word, every word and every number in order, then list each "
    "number in it again, one per line, and after that explain what each word could mean."
)
"""The question of every maximal QA generation: it asks for an answer as long as allowed."""


def stack_role(pid: int, argv: list[str], root: int) -> str:
    """api, worker, beat or supervisor (`app.cli run` itself), from a process's command line."""
    if pid == root:
        return "supervisor"
    if "uvicorn" in argv:
        return "api"
    if "celery" in argv:
        return "beat" if "beat" in argv else "worker" if "worker" in argv else "celery"
    return "other"


def filled_text(chars: int, numbers: float, seed: int) -> str:
    """`chars` characters of words, a `numbers` share of them replaced by 3-digit numbers (which
    take about one token a character, against about 6 characters a token for these words). The
    same seed draws the same choices whatever `numbers` is, so more numbers never means fewer
    tokens at the same length by more than a token or two."""
    rng = random.Random(seed)
    pieces, length = [], 0
    while length <= chars:
        draw, word, number = rng.random(), rng.choice(WORDS), str(rng.randrange(100, 1000))
        pieces.append(number if draw < numbers else word)
        length += len(pieces[-1]) + 1
    return " ".join(pieces)[:chars]


def maximal_qa(
    tokenizer: Any, max_chars: int, max_tokens: int, seed: int
) -> tuple[dict[str, str], int]:
    """A QA input of exactly `max_chars` characters (question plus context) whose prompt after
    the chat template is as many tokens as may be up to `max_tokens`, and that token count."""
    from app.models import Task
    from app.services.prompts import user_message

    def tokens(data: dict[str, str]) -> int:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(Task.qa, data)}],
            tokenize=False, add_generation_prompt=True,
        )  # fmt: skip
        return len(tokenizer(prompt, add_special_tokens=False).input_ids)

    def data(numbers: float) -> dict[str, str]:
        context = filled_text(max_chars - len(LONG_ANSWER), numbers, seed)
        return {"question": LONG_ANSWER, "context": context}

    low, high = 0.0, 1.0  # the share of numbers: low fits (or nothing does), high may not
    if tokens(data(high)) <= max_tokens:
        low = high
    else:
        for _ in range(14):
            middle = (low + high) / 2
            low, high = (middle, high) if tokens(data(middle)) <= max_tokens else (low, middle)
    best = data(low)
    return best, tokens(best)


def capped_text(tokenizer: Any, limit: int, seed: int) -> str:
    """Words of exactly `limit` tokens as the API counts them (or a word fewer, where decoding
    the cut does not give the same tokens back)."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(WORDS) for _ in range(limit * 2))
    ids = tokenizer(words, add_special_tokens=False).input_ids[:limit]
    text = str(tokenizer.decode(ids)).strip()
    while len(tokenizer(text, add_special_tokens=False).input_ids) > limit:
        text = text.rsplit(" ", 1)[0]
    return text


async def generate_all(
    base: str, bodies: list[tuple[str, dict[str, Any]]], timeout: float
) -> list[dict[str, Any]]:
    """POST each (key, body) to /v1/qa at once; each answer's JSON, retrying 429s."""

    async def one(client: httpx.AsyncClient, key: str, body: dict[str, Any]) -> dict[str, Any]:
        while True:
            response = await client.post(
                "/v1/qa", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            if response.status_code == 429:
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            if response.status_code != 200:
                raise RuntimeError(f"/v1/qa answered {response.status_code}: {response.text}")
            answer: dict[str, Any] = response.json()
            return answer

    limits = httpx.Limits(max_connections=len(bodies) + 2)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, key, body) for key, body in bodies)))


def span(values: list[int]) -> str:
    """`low-high` of some counts (one figure when they are all the same)."""
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def round_phase(args: argparse.Namespace) -> bool:
    """20 maximal QA ratings, one round on a real worker under `app.cli run`: print the figures;
    True if the round finished (published or rejected) with the stack within the target."""
    from transformers import AutoTokenizer  # heavy: only for this half

    from app.training_config import TokenBudget, TrainConfig

    model_dir = prepared_model(args.model)
    data_dir = Path(tempfile.mkdtemp(prefix="flm-abuse-round-"))
    # Only where the stack keeps its data and which model: every other setting is its default.
    overrides = {"DATA_DIR": str(data_dir), "DATABASE_URL": f"sqlite:///{data_dir / 'round.db'}",
                 "REDIS_URL": "", "MODEL": str(model_dir), "ADMIN_API_KEY": ADMIN,
                 "HOST": "127.0.0.1", "PORT": str(args.round_port)}  # fmt: skip
    # What the stack's processes read (they start in ROOT, where a `.env` would apply too).
    values: dict[str, Any] = {name.lower(): value for name, value in overrides.items()}
    settings = Settings(_env_file=ROOT / ".env", **values)
    budget = TokenBudget.from_settings(settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = {} if args.epochs == 0 else {"epochs": args.epochs}
    log_path = data_dir / "stack.log"
    print(f"round half: stack log in {log_path}", flush=True)

    with log_path.open("wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "run"], env={**os.environ, **overrides}, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    killed: list[str] = []

    def guard(total: float) -> None:
        """Above --kill-above-gib, SIGKILL the largest process (once): a runaway round must not
        take the machine's memory from everything else on it."""
        if killed or not args.kill_above_gib or total <= args.kill_above_gib:
            return
        alive = [p for p in sampler.processes.values() if p.alive]
        largest = max(alive, key=lambda p: p.rss)
        killed.append(
            f"the stack reached {total:.2f} GiB, over --kill-above-gib {args.kill_above_gib:g}: "
            f"the bench killed the {largest.role} (pid {largest.pid}) at {largest.rss:.2f} GiB"
        )
        print(killed[-1], flush=True)
        os.kill(largest.pid, signal.SIGKILL)

    sampler = TreeSampler(
        supervisor.pid, lambda pid, argv: stack_role(pid, argv, supervisor.pid), every=0.25,
        on_sample=guard,
    )  # fmt: skip
    sampler.start()
    base = f"http://127.0.0.1:{args.round_port}"
    problems: list[str] = []
    try:
        wait_ready(f"{base}/readyz", supervisor, 600)
        time.sleep(5)  # the worker and beat finish starting (they need no model to be ready)
        sampler.window = "generating"
        keys = [key for key, _ in user_keys(base, ADMIN, args.raters, "round")]
        auth = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731

        # The limits first: one character more, one token more, each a 422.
        inputs = [
            maximal_qa(tokenizer, settings.max_prompt_chars, settings.max_prompt_tokens, seed)
            for seed in range(args.ratings)
        ]
        over = dict(inputs[0][0], question=inputs[0][0]["question"] + "?")
        refused = httpx.post(f"{base}/v1/qa", json=over, headers=auth(keys[0]), timeout=60)
        if refused.status_code != 422:
            problems.append(f"an input over MAX_PROMPT_CHARS got {refused.status_code}, not 422")

        bodies = [
            (keys[i % len(keys)], {**data, "max_new_tokens": args.max_new_tokens})
            for i, (data, _) in enumerate(inputs)
        ]
        started = time.monotonic()
        answers = asyncio.run(generate_all(base, bodies, args.round_timeout))
        generating = time.monotonic() - started

        cap = budget.max_answer_tokens
        comment = filled_text(4000, 0.0, 99)
        over_cap = capped_text(tokenizer, cap + 8, 1000)
        refused_correction = httpx.post(
            f"{base}/v1/feedback",
            json={"generation_id": answers[0]["id"], "thumbs": "up", "correction": over_cap},
            headers=auth(keys[0]), timeout=60,
        )  # fmt: skip
        if refused_correction.status_code != 422:
            problems.append(
                f"a correction over the cap got {refused_correction.status_code}, not 422"
            )
        corrections = []
        for i, answer in enumerate(answers):
            correction = capped_text(tokenizer, cap, i)
            corrections.append(len(tokenizer(correction, add_special_tokens=False).input_ids))
            rated = httpx.post(
                f"{base}/v1/feedback",
                json={"generation_id": answer["id"], "thumbs": "up" if i % 2 else "down",
                      "correction": correction, "comment": comment},
                headers=auth(bodies[i][0]), timeout=60,
            )  # fmt: skip
            if rated.status_code != 201:
                raise RuntimeError(f"/v1/feedback answered {rated.status_code}: {rated.text}")

        workers = [p for p in sampler.of_role("worker") if p.alive]
        if len(workers) != 1:
            raise RuntimeError(
                f"expected one worker process, found {len(workers)}"
                + "".join(f"; {note}" for note in killed)
            )
        worker = workers[0]
        idle_worker = worker.rss
        sampler.window = "round"
        requested = time.monotonic()
        started_run = httpx.post(
            f"{base}/v1/training/runs", json={"train": train} if train else None,
            headers=auth(ADMIN), timeout=60,
        )  # fmt: skip
        if started_run.status_code != 202:
            raise RuntimeError(f"POST /v1/training/runs answered {started_run.status_code}")
        run_id = started_run.json()["id"]
        run: dict[str, Any] = started_run.json()
        while run["status"] in ("queued", "running"):
            if time.monotonic() - requested > args.round_timeout:
                problems.append(f"the round did not finish within {args.round_timeout:.0f} s")
                break
            if not worker.alive:
                problems.append(f"the worker (pid {worker.pid}) died during the round")
                problems += killed or [kernel_kill(worker.pid)]
                break
            time.sleep(2)
            try:
                run = httpx.get(
                    f"{base}/v1/training/runs/{run_id}", headers=auth(ADMIN), timeout=60
                ).json()
            except httpx.HTTPError as exc:  # a busy API: ask again at the next poll
                print(f"polling the round: {exc!r}", flush=True)
        waited = time.monotonic() - requested
        problems += [note for note in killed if note not in problems]  # a kill fails the bench
        sampler.window = "after"
        time.sleep(1)
    finally:
        try:
            sampler.stop()
        finally:
            stop(supervisor)

    # The figures.
    prompt_tokens = [a["usage"]["prompt_tokens"] for a in answers]
    completion_tokens = [a["usage"]["completion_tokens"] for a in answers]
    chars = [len(data["question"]) + len(data["context"]) for data, _ in inputs]
    print(f"\nround over {args.ratings} maximal QA ratings, model {model_dir.name}, "
          f"{len(keys)} user keys")  # fmt: skip
    print(f"generations: {len(answers)} in {generating:.0f} s; input {span(chars)} chars "
          f"(MAX_PROMPT_CHARS {settings.max_prompt_chars}), prompt {span(prompt_tokens)} tokens "
          f"(MAX_PROMPT_TOKENS {settings.max_prompt_tokens}), answers "
          f"{span(completion_tokens)} tokens (max_new_tokens {args.max_new_tokens})")  # fmt: skip
    print(f"ratings: {len(answers)}, thumbs up and down in turn, each with a correction of "
          f"{span(corrections)} tokens (cap {cap}) and a {len(comment)}-character comment; "
          f"over-long input: {refused.status_code}; over-cap correction "
          f"({cap + 8} tokens asked): {refused_correction.status_code}")  # fmt: skip
    epochs = f"epochs {args.epochs}" if train else f"epochs {TrainConfig().epochs}"
    print(f"token budget: {budget.to_dict()}; TrainConfig defaults but {epochs}, "
          f"batch_size {TrainConfig().batch_size} (micro-batches of at most "
          f"{budget.batch_tokens // budget.max_length} rows; a DPO row is a pair)")  # fmt: skip
    counts = run.get("counts", {})
    print("round data: " + ", ".join(f"{k} {counts[k]}" for k in (
        "train_kto", "train_pairs", "heldout_kto", "heldout_pairs") if k in counts))  # fmt: skip
    status = run["status"]
    if status == "succeeded":
        outcome = f"published {run['version']}" + (f" ({run['reason']})" if run["reason"] else "")
    elif status == "rejected":
        outcome = f"rejected by the gate ({run['version']} kept as rejected): {run['reason']}"
    elif status in ("queued", "running"):
        outcome = f"did not finish (still {status})"
    else:
        outcome = f"{status}: {run.get('reason')}"
        problems.append(f"the round ended {status}")
    print(f"round {run_id}: {outcome}")
    duration = "-"
    if run.get("started_at") and run.get("finished_at"):
        from datetime import datetime

        took = datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(
            run["started_at"]
        )
        duration = f"{took.total_seconds():.0f} s"
    print(f"round duration: {duration} (claimed to finished); {waited:.0f} s from the request")
    metrics = run.get("metrics", {})
    shown = ("preference_gain", "kl_to_base", "repetition", "length_ratio", "empty_fraction")
    if any(isinstance(metrics.get(k), float) for k in shown):
        print("gate: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics))

    print(f"\nworker (pid {worker.pid}): peak resident {worker.hwm:.2f} GiB (VmHWM; sampled "
          f"peak {worker.peak_rss:.2f}), {idle_worker:.2f} GiB before the round")  # fmt: skip
    print(f"{'process':11} {'pid':>7} {'peak GiB':>9} {'sampled':>8}")
    for process in sorted(sampler.processes.values(), key=lambda p: p.pid):
        print(f"{process.role:11} {process.pid:7} {process.hwm:9.2f} {process.peak_rss:8.2f}")
    print(f"{'window':11} {'RSS sum':>8} {'PSS sum':>8}  by role (peak RSS, GiB)")
    for name, peak in sampler.windows.items():
        roles = ", ".join(f"{role} {rss:.2f}" for role, rss in sorted(peak.by_role.items()))
        print(f"{name:11} {peak.rss:8.2f} {peak.pss:8.2f}  {roles}")
    stack_rss = max(peak.rss for peak in sampler.windows.values())
    stack_pss = max(peak.pss for peak in sampler.windows.values())
    hwm_sum = sum(p.hwm for p in sampler.processes.values())
    verdict = "within" if stack_rss <= args.target_gib else "OVER"
    print(f"stack peak resident (API + worker + beat + supervisor): {stack_rss:.2f} GiB RSS sum, "
          f"{stack_pss:.2f} GiB PSS sum ({hwm_sum:.2f} GiB adding each process's own peak); "
          f"target {args.target_gib:g} GiB: {verdict}")  # fmt: skip
    if stack_rss > args.target_gib:
        problems.append(f"the stack's peak {stack_rss:.2f} GiB is over {args.target_gib:g} GiB")
    for problem in problems:
        print(f"FAILED: {problem}")
    if problems:
        print(f"the stack log's last lines ({log_path}), requests and progress bars left out:")
        lines = log_path.read_text(errors="replace").splitlines()
        quiet = [line for line in lines if "HTTP/1.1" not in line and "examples/s" not in line]
        print("\n".join(f"  {line[:300]}" for line in quiet[-15:]))
    return not problems


def kernel_kill(pid: int) -> str:
    """What the kernel log says about killing `pid` (the OOM killer's line), if anything."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        log = ""
    lines = [line for line in log.splitlines() if f"Killed process {pid} " in line]
    return lines[-1].strip() if lines else "no kernel OOM line names it (a crash: see the log)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase", choices=("serve", "round", "both"), default="both")
    serve = parser.add_argument_group("serve")
    serve.add_argument("--clients", type=int, default=8, help="keys chatting normally")
    serve.add_argument("--duration", type=float, default=40, help="seconds a phase")
    serve.add_argument("--abuser-concurrency", type=int, default=16)
    serve.add_argument(
        "--rate-limit", default="120/minute",
        help="RATE_LIMIT_GENERATION for every key (the default's; none: the abuser floods)",
    )  # fmt: skip
    serve.add_argument("--max-chars", type=int, default=16_000, help="MAX_PROMPT_CHARS")
    serve.add_argument(
        "--max-ratio", type=float, default=2.0, help="most abused / idle TBT p99 (issue 14)"
    )
    serve.add_argument("--port", type=int, default=8712)
    round_ = parser.add_argument_group("round")
    round_.add_argument("--ratings", type=int, default=20, help="maximal QA ratings")
    round_.add_argument("--raters", type=int, default=4, help="user keys they are spread over")
    round_.add_argument(
        "--epochs", type=int, default=1, help="the round's epochs (0: TrainConfig's default, 2)"
    )
    round_.add_argument("--max-new-tokens", type=int, default=1024, help="of each generation")
    round_.add_argument(
        "--kill-above-gib", type=float, default=12.0,
        help="SIGKILL the stack's largest process if the stack passes this (0: never)",
    )  # fmt: skip
    round_.add_argument("--round-port", type=int, default=8713)
    round_.add_argument("--round-timeout", type=float, default=3600, help="seconds, each step")
    round_.add_argument("--target-gib", type=float, default=8.0, help="the stack's bound")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    ok = True
    if args.phase in ("serve", "both"):
        ok = serve_phase(args) and ok
    if args.phase in ("round", "both"):
        ok = round_phase(args) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
