"""Token and memory budgets: prompts counted in tokens, a KV-cache budget, a cap per key, and
requests cancelled when their client goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.engine.chat import chat_prompt
from app.engine.decoders import decoder_for
from app.engine.loading import load_model
from app.engine.registry import ModelRegistry, ServingVersion
from app.engine.requests import GenerationStream, OwnerBusy, PromptTooLong, SamplingParams
from app.engine.scheduler import Engine, EngineLimits
from app.main import create_app
from app.models import Generation, Task
from app.services import generations
from app.services.errors import Busy
from app.state import app_state


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> ServingVersion:
    model, tokenizer = load_model(tiny_model_dir, torch.float32)
    return ServingVersion(1, "v0", model, tokenizer)


def engine_with(base: ServingVersion, **limits: object) -> Engine:
    registry = ModelRegistry()
    registry.activate(base)
    return Engine(registry, limits=EngineLimits(**limits))  # type: ignore[arg-type]


def submit(
    engine: Engine, text: str, owner: int | None = None, **params: object
) -> GenerationStream:
    sampling = SamplingParams(**params)  # type: ignore[arg-type]
    with engine.lease() as lease:
        prompt = chat_prompt(lease.version.tokenizer, text)
        return engine.submit(lease, prompt, sampling, owner=owner)


@contextmanager
def slowed(engine: Engine, seconds: float = 0.01) -> Iterator[None]:
    """Every forward pass of the active model takes `seconds` longer: the tiny model is so fast
    that a request would otherwise be over before a test can act on it."""
    model = engine.registry.active.model
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        hook.remove()


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"max_prompt_tokens": 30}))) as client:
        yield client


def test_prompt_tokens_are_counted_after_the_chat_template(
    app_client: TestClient, admin: dict[str, str]
) -> None:
    """A short question is under MAX_PROMPT_TOKENS on its own, but not with the chat
    template's system prompt around it: the limit is on what the model reads."""
    body = {"prompt": "Say hi to everyone here today.", "max_new_tokens": 2}
    response = app_client.post("/v1/generate", json=body, headers=admin)
    assert response.status_code == 422, response.text
    message = response.json()["detail"][0]["msg"]
    assert "after the chat template" in message and "MAX_PROMPT_TOKENS" in message
    chat = {"model": "default", "messages": [{"role": "user", "content": body["prompt"]}]}
    response = app_client.post("/v1/chat/completions", json=chat, headers=admin)
    assert (
        response.status_code == 422 and "MAX_PROMPT_TOKENS" in response.json()["error"]["message"]
    )


def test_a_request_that_could_never_fit_the_kv_budget_is_refused_at_once(
    base: ServingVersion,
) -> None:
    """Its keys and values alone would pass KV_CACHE_BYTES: a clear error, nothing queued."""
    one = decoder_for(base).footprint([100])
    engine = engine_with(base, kv_cache_bytes=one)
    submit(engine, "Hi", max_new_tokens=100 - 40)  # fits (the prompt is under 40 tokens)
    with pytest.raises(PromptTooLong, match="KV_CACHE_BYTES"):
        submit(engine, "Hi", max_new_tokens=400)
    assert engine.waiting == 1
    engine.stop()


def test_requests_wait_for_room_in_the_kv_budget_and_all_finish(base: ServingVersion) -> None:
    """With room for one request's keys and values, four run one after another and the KV
    caches never hold more than the budget; without a budget they run together."""
    reach = 300
    budget = decoder_for(base).footprint([reach])
    tight = engine_with(base, kv_cache_bytes=budget)
    free = engine_with(base)
    for engine in (tight, free):
        engine.start()
        streams = [
            submit(engine, f"Story {i}.", max_new_tokens=reach - 40, temperature=0)
            for i in range(4)
        ]
        for stream in streams:
            assert stream.result(120).finish_reason == "length"
        engine.stop()
    assert 0 < tight.kv_allocated_peak <= budget
    assert free.kv_allocated_peak > budget  # the same requests, unbudgeted, take more


def test_a_key_may_have_only_so_many_requests_in_flight(
    base: ServingVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond MAX_REQUESTS_PER_KEY a key gets OwnerBusy (a 429) at once; other keys do not,
    and a finished request frees its place."""
    engine = engine_with(base, max_per_owner=2)
    first = submit(engine, "Hi", owner=1, max_new_tokens=2)
    submit(engine, "Hi", owner=1, max_new_tokens=2)
    started = time.perf_counter()
    with pytest.raises(OwnerBusy, match="MAX_REQUESTS_PER_KEY"):
        submit(engine, "Hi", owner=1, max_new_tokens=2)
    assert time.perf_counter() - started < 1
    # Refused before its prompt is rendered or tokenized (found by bench/abuse.py: a key
    # retrying at once took a third of a core tokenizing prompts that were then refused).
    rendered: list[int] = []
    monkeypatch.setattr(generations, "chat_prompt", lambda *_: str(rendered.append(1)))
    leased = engine.registry.lease
    monkeypatch.setattr(engine.registry, "lease", lambda: rendered.append(2) or leased())
    with pytest.raises(Busy, match="MAX_REQUESTS_PER_KEY"):
        generations.queue_generation(
            engine, task=Task.generate, data={"prompt": "Hi"}, params=SamplingParams(),
            max_chars=100, owner=1,
        )  # fmt: skip
    assert rendered == []  # neither leased nor rendered
    monkeypatch.undo()
    submit(engine, "Hi", owner=2, max_new_tokens=2)
    engine.start()
    first.result(60)
    deadline = time.monotonic() + 30
    while True:
        try:
            submit(engine, "Hi", owner=1, max_new_tokens=2).result(60)
            break
        except OwnerBusy:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    engine.stop()


def test_a_key_over_its_cap_gets_429(settings: Settings, admin: dict[str, str]) -> None:
    """Through the API: the cap answers 429 with a message that names the setting."""
    with TestClient(create_app(settings.model_copy(update={"max_requests_per_key": 1}))) as client:
        engine = app_state(client.app).engine
        key_id = 1  # the bootstrap admin
        with slowed(engine):
            held = submit(engine, "Hold the place.", owner=key_id, max_new_tokens=400)
        try:
            response = client.post(
                "/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=admin
            )
            assert response.status_code == 429, response.text
            assert "MAX_REQUESTS_PER_KEY" in response.json()["detail"]
        finally:
            held.cancel()
            held.result(60)


def test_a_non_streamed_request_is_cancelled_when_its_client_goes_away(
    settings: Settings, admin: dict[str, str], sessions: object
) -> None:
    """A client that times out and closes its connection stops its generation: it is
    recorded as cancelled instead of taking the engine for its whole answer."""
    import uvicorn

    from tests.helpers import free_port

    app = create_app(settings.model_copy(update={"max_batch_size": 1}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    stack = ExitStack()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/generate"
        stack.enter_context(slowed(app_state(app).engine))
        body = {"prompt": "Tell me a long story.", "max_new_tokens": 450, "temperature": 0}
        holder = threading.Thread(
            target=lambda: httpx.post(url, json=body, headers=admin, timeout=120)
        )
        holder.start()  # takes the only batch slot
        time.sleep(0.2)
        retried = {**admin, "Idempotency-Key": "gone-once"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={**body, "prompt": "Another one."}, headers=retried, timeout=0.3)
        holder.join(120)
        deadline = time.monotonic() + 30
        while True:
            with sessions() as session:  # type: ignore[operator]
                rows = list(session.scalars(select(Generation).order_by(Generation.id)))
            if len(rows) == 2:
                break
            assert time.monotonic() < deadline, "the cancelled generation was not recorded"
            time.sleep(0.1)
        by_prompt = {row.input["prompt"]: row for row in rows}
        held, gone = by_prompt["Tell me a long story."], by_prompt["Another one."]
        assert held.finish_reason == "length" and held.completion_tokens == 450
        assert gone.finish_reason == "cancelled" and gone.completion_tokens < 450
        # The cancelled answer is not kept for the key to replay: the retry runs.
        stack.close()
        deadline = time.monotonic() + 30
        while (
            retry := httpx.post(url, json={**body, "prompt": "Another one."}, headers=retried)
        ).status_code == 409:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert retry.status_code == 200, retry.text
        assert retry.json()["finish_reason"] == "length"
        assert "Idempotent-Replayed" not in retry.headers
    finally:
        stack.close()
        server.should_exit = True
        thread.join(30)


def test_running_requests_keep_decoding_while_a_long_prompt_is_prefilled(
    base: ServingVersion,
) -> None:
    """A long prompt is prefilled a chunk between decode steps: the running row gets a token
    at every step meanwhile, instead of waiting for the whole prompt."""
    from app.engine.batch import Batch

    def stream(text: str, max_new_tokens: int, seed: int | None = None) -> GenerationStream:
        prompt = base.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=seed)
        return GenerationStream(base, prompt, params, ExitStack())

    batch = Batch(base, chunk=32)
    running = stream("Keep talking.", 400)
    batch.admit([running])
    batch.step()
    (row,) = batch.rows
    long = stream(" ".join(["word"] * 300), 5)
    batch.admit([long])
    assert len(batch) == 2 and len(batch.rows) == 1  # not prefilled at once
    steps = 0
    while len(batch.rows) == 1:
        before = len(row.tokens)
        batch.step()
        steps += 1
        assert len(row.tokens) == before + 1
    assert steps >= 300 // 32 - 1
    assert len(batch.rows[1].tokens) == 2  # its first token, then the step's like the others


def test_a_seeded_long_prompt_gives_the_same_answer_again(base: ServingVersion) -> None:
    """Chunked prefill repeats the same arithmetic, so a seed still repeats its answer."""
    engine = engine_with(base, prefill_chunk=32)
    engine.start()
    text = " ".join(["story"] * 200)
    answers = {
        submit(engine, text, max_new_tokens=12, temperature=1.0, seed=7).result(60).text
        for _ in range(3)
    }
    engine.stop()
    assert len(answers) == 1


def test_one_key_reserves_at_most_its_share_of_the_kv_budget(base: ServingVersion) -> None:
    """A key past its share waits while another key's request runs at once; one request alone
    always may run, so the key is slowed, never stuck."""
    one = decoder_for(base).footprint([300])
    engine = engine_with(base, kv_cache_bytes=4 * one, kv_share_per_owner=0.3)
    with slowed(engine):
        first = submit(engine, "Hold on.", owner=1, max_new_tokens=260, temperature=0)
        second = submit(engine, "Me too.", owner=1, max_new_tokens=260, temperature=0)
        other = submit(engine, "Hi.", owner=2, max_new_tokens=3, temperature=0)
        engine.start()
        assert other.result(60).completion_tokens == 3
        assert not second._done.is_set() and first.next_delta(30)
        assert first.result(60).finish_reason == "length"
        assert second.result(60).finish_reason == "length"
    engine.stop()


def test_the_budget_counts_the_buffer_a_long_prompt_is_prefilled_into(
    base: ServingVersion,
) -> None:
    """Found in review: a prompt prefilled in chunks has a buffer of its own until it joins;
    the budget reserved only its row, so long prompts took about twice what it allowed."""
    text = " ".join(["word"] * 280)
    prompt_tokens = len(base.tokenizer(base.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    ), add_special_tokens=False).input_ids)  # fmt: skip
    reach = prompt_tokens + 20
    budget = decoder_for(base).footprint([reach], [prompt_tokens])
    engine = engine_with(base, kv_cache_bytes=budget, prefill_chunk=32)
    engine.start()
    streams = [submit(engine, text, max_new_tokens=20, temperature=0) for _ in range(3)]
    for stream in streams:
        assert stream.result(120).finish_reason == "length"
    engine.stop()
    assert 0 < engine.kv_allocated_peak <= budget


def _stream(base: ServingVersion, text: str, max_new_tokens: int) -> GenerationStream:
    prompt = base.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    return GenerationStream(base, prompt, params, ExitStack())


def test_a_long_batch_steps_a_few_layers_at_a_time_and_answers_as_it_would_whole(
    base: ServingVersion,
) -> None:
    """Beside short requests, a long batch's decode step runs in parts (here one layer each),
    chunks and decode steps taking turns; a request arriving mid-step joins after it. The
    answers are those of the same batch stepped whole."""
    from app.engine.batch import Batch

    layers = len(base.llama.layers) if base.llama is not None else 0
    assert layers >= 2

    def answers(part_seconds: float | None) -> tuple[list[str], list[int]]:
        batch = Batch(base, chunk=32)
        first = _stream(base, "Tell me a long story about a river.", 12)
        batch.admit([first])
        arrivals = [
            _stream(base, "And a short one.", 6),
            _stream(base, " ".join(["stone"] * 80), 6),
        ]
        tokens_per_step, steps = [], 0
        while batch:
            before = sum(len(row.tokens) for row in batch.rows)
            done = batch.step(part_seconds=part_seconds)
            steps += 1
            if steps == 1:
                batch.admit(arrivals)
                if part_seconds is not None:  # mid-step: they wait for the step to end
                    assert len(batch.rows) == 1 and len(batch.deferred) == 2
            tokens_per_step.append(
                sum(len(row.tokens) for row in batch.rows)
                + sum(len(row.tokens) for row, _ in done) - before
            )  # fmt: skip
            for row, _ in done:
                row.stream._finish(row.stream.completion(row.text.text, len(row.tokens), "x"))
        texts = [s.result(0).text for s in (first, *arrivals)]
        return texts, tokens_per_step

    whole, whole_steps = answers(None)
    parted, parted_steps = answers(1e-9)  # always less than a layer: one layer a part
    assert parted == whole
    # Parts that end no decode step give no token: about every other part with two layers.
    assert parted_steps.count(0) >= len(parted_steps) // 3
    assert 0 not in whole_steps and len(parted_steps) > 1.5 * len(whole_steps)


def test_prompts_arriving_together_are_prefilled_about_a_chunk_a_step_while_rows_decode(
    base: ServingVersion,
) -> None:
    """Many short prompts arriving at once were prefilled in one pass, however many tokens
    they made together, while every running row waited for it; now a step admits about one
    chunk's tokens of them (always at least one), and all of them when nothing is running."""
    from app.engine.batch import Batch
    from app.engine.scheduler import lane_of

    engine = engine_with(base, prefill_chunk=64)
    streams = [
        submit(engine, f"Question number {i} about rivers?", max_new_tokens=4) for i in range(8)
    ]
    tokens = streams[0].prompt_tokens
    assert 8 * tokens > 64 >= tokens
    assert len(engine._admit({})) == 8  # nothing running: all at once
    running = Batch(base, chunk=64)
    running.admit([_stream(base, "Keep talking.", 50)])
    lane = lane_of(streams[0])
    for stream in streams:
        engine._waiting.append(stream)
    taken = engine._admit({lane: running})
    assert len(taken) >= 1 and sum(s.prompt_tokens for s in taken) <= max(64, tokens)
    assert len(engine._waiting) == 8 - len(taken)
