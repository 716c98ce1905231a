"""The generation loop on the tiny model: continuous batching, seeds, cancellation, two versions."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.engine.batch import prefill_groups
from app.engine.chat import chat_prompt
from app.engine.loading import load_model
from app.engine.registry import ModelRegistry, ServingVersion
from app.engine.requests import GenerationStream, SamplingParams
from app.engine.sampling import CANDIDATES, _sample
from app.engine.scheduler import Engine, EngineLimits


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> ServingVersion:
    model, tokenizer = load_model(tiny_model_dir, torch.float32)
    return ServingVersion(1, "v0", model, tokenizer)


@pytest.fixture
def engine(base: ServingVersion) -> Iterator[Engine]:
    registry = ModelRegistry()
    registry.activate(base)
    running = Engine(registry, max_batch=8)
    running.start()
    yield running
    running.stop()


def submit(engine: Engine, text: str, **params: object) -> GenerationStream:
    sampling = SamplingParams(**params)  # type: ignore[arg-type]
    with engine.lease() as lease:
        return engine.submit(lease, chat_prompt(lease.version.tokenizer, text), sampling)


def test_a_short_request_joins_and_leaves_while_a_long_one_runs(engine: Engine) -> None:
    """New requests join at token boundaries and finished ones leave: no waiting in line."""
    long = submit(engine, "Tell me a long story.", max_new_tokens=400, temperature=0)
    assert long.next_delta(30)  # decoding has started
    short = submit(engine, "Hi", max_new_tokens=3, temperature=0)
    done = short.result(30)
    assert done.completion_tokens == 3 and done.finish_reason == "length"
    assert not long._done.is_set(), "the short request waited for the long one"
    assert long.result(60).completion_tokens == 400


def test_a_failed_prefill_fails_its_request_and_the_batch_goes_on(
    engine: Engine, base: ServingVersion
) -> None:
    """An error in a new request's prefill reaches that request; the running one finishes."""
    failing = threading.Event()

    def fail_prefills(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if failing.is_set() and args[0].shape[1] > 1:  # prefill: more than one token a row
            raise RuntimeError("prefill broke")

    hook = base.model.get_input_embeddings().register_forward_pre_hook(fail_prefills)
    try:
        running = submit(engine, "Tell me a long story.", max_new_tokens=60, temperature=0)
        assert running.next_delta(30)
        failing.set()
        with pytest.raises(RuntimeError, match="prefill broke"):
            # A prompt no other test sends: its prefill computes more than one token a row.
            submit(engine, "Something nobody asked before.", max_new_tokens=3).result(30)
        failing.clear()
        assert running.result(60).completion_tokens == 60
        assert submit(engine, "Hi", max_new_tokens=3).result(30).completion_tokens == 3
    finally:
        hook.remove()


def test_a_seeded_request_run_again_gives_the_same_answer(engine: Engine) -> None:
    """Same seed and prompt, same answer, though the prefix store holds the prompt by then and
    other requests ran in between; another seed, another answer."""
    first = submit(engine, "Pick words.", max_new_tokens=24, seed=7).result(30).text
    others = [submit(engine, f"Pick words. {i}", max_new_tokens=20) for i in range(5)]
    assert all(o.result(30).completion_tokens == 20 for o in others)
    for _ in range(3):
        assert submit(engine, "Pick words.", max_new_tokens=24, seed=7).result(30).text == first
    different = submit(engine, "Pick words.", max_new_tokens=24, seed=8).result(30).text
    assert different != first


def test_streamed_pieces_add_up_to_the_answer(engine: Engine) -> None:
    """What a client reads from the stream is exactly the recorded answer."""
    stream = submit(engine, "Say something.", max_new_tokens=30, temperature=0.9, seed=1)
    pieces = list(stream)
    assert "".join(pieces) == stream.result().text and len(pieces) > 1


def test_a_cancelled_request_stops_and_frees_its_place(engine: Engine) -> None:
    """Cancelling ends the request at the next step, with what was generated so far."""
    stream = submit(engine, "Go on and on.", max_new_tokens=400, temperature=0)
    assert stream.next_delta(30)
    stream.cancel()
    done = stream.result(30)
    assert done.finish_reason == "cancelled" and done.completion_tokens < 400
    assert submit(engine, "Next", max_new_tokens=2).result(30).completion_tokens == 2


def test_two_versions_decode_side_by_side_through_a_swap(
    engine: Engine, base: ServingVersion
) -> None:
    """After a swap, new requests run on the new version while older ones finish on theirs."""
    old = submit(engine, "Keep talking.", max_new_tokens=300, temperature=0)
    assert old.next_delta(30)
    changed = copy.deepcopy(base.model)
    with torch.no_grad():
        changed.model.norm.weight.mul_(-1)  # a different model: different greedy answers
    engine.registry.activate(ServingVersion(2, "v1", changed, base.tokenizer, recyclable=True))
    new = submit(engine, "Keep talking.", max_new_tokens=5, temperature=0)
    assert new.result(30).version.name == "v1"
    assert not old._done.is_set()
    finished = old.result(60)
    assert finished.version.name == "v0" and finished.completion_tokens == 300
    # Each ran in its own batch on its own weights: the same answer as on that version alone.
    alone = engine.generate(
        chat_prompt(base.tokenizer, "Keep talking."),
        SamplingParams(max_new_tokens=300, temperature=0),
        version=base,
    )
    assert alone.text == finished.text and alone.version.name == "v0"


def test_a_full_queue_refuses_at_once(base: ServingVersion) -> None:
    """Beyond max_waiting the engine raises instead of queueing without bound."""
    from app.engine.requests import EngineBusy

    registry = ModelRegistry()
    registry.activate(base)
    idle = Engine(registry, max_waiting=2)  # not started: nothing leaves the queue
    for _ in range(2):
        submit(idle, "Hi", max_new_tokens=2)
    started = time.perf_counter()
    with pytest.raises(EngineBusy, match="2 requests are already waiting"):
        submit(idle, "Hi", max_new_tokens=2)
    assert time.perf_counter() - started < 1
    idle.stop()


def rows(*params: SamplingParams, seed: int | None = None) -> list[Any]:
    """What `_sample` reads of a batch's rows: their parameters and generators."""
    return [
        SimpleNamespace(
            stream=SimpleNamespace(params=p),
            generator=None if seed is None else torch.Generator().manual_seed(seed),
        )
        for p in params
    ]


def test_sampling_keeps_to_the_nucleus() -> None:
    """Only the smallest set of tokens reaching top_p is ever drawn, the last of it included."""
    probs = torch.full((5000,), 0.05 / 4989)
    probs[:10], probs[10] = 0.09, 0.05  # 0.90 in ten tokens, then 0.05; 0.95 reached at 11
    logits = probs.log()[None, :]
    drawn = [
        _sample(logits, rows(SamplingParams(temperature=1.0, top_p=0.92), seed=i))[0]
        for i in range(500)
    ]
    assert set(drawn) <= set(range(11)) and 10 in drawn


def test_a_nucleus_wider_than_the_first_candidates_is_sampled_in_full() -> None:
    """With a flat distribution the nucleus holds thousands of tokens, and any of them comes."""
    logits = torch.zeros(1, 3000)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    drawn = {_sample(logits, rows(params, seed=i))[0] for i in range(2000)}
    assert len(drawn) > 2 * CANDIDATES


def test_top_p_1_samples_the_whole_distribution() -> None:
    """OpenAI's default top_p of 1 draws every token at its probability, the least likely too,
    and a seeded row draws the same beside a nucleus row as alone."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None, :]
    whole = SamplingParams(temperature=1.0, top_p=1.0)
    drawn = [_sample(logits, rows(whole, seed=i))[0] for i in range(4000)]
    frequencies = torch.bincount(torch.tensor(drawn), minlength=4) / len(drawn)
    assert torch.allclose(frequencies, probs, atol=0.025)
    nucleus = SamplingParams(temperature=1.0, top_p=0.6)
    beside = [
        _sample(torch.cat([logits, logits]), [*rows(nucleus, seed=1000 + i), *rows(whole, seed=i)])
        for i in range(200)
    ]
    assert [b[1] for b in beside] == drawn[:200]
    assert {b[0] for b in beside} == {0, 1}


def test_a_seeded_row_draws_the_same_tokens_beside_any_other_row() -> None:
    """Each row draws from its own generator: neighbours never shift a seeded row's tokens."""
    torch.manual_seed(0)
    logits = torch.randn(2, 1000) * 3
    params = SamplingParams(temperature=0.8, top_p=0.9)
    alone = [_sample(logits[1:], rows(params, seed=s))[0] for s in range(50)]
    beside = [_sample(logits, [*rows(params), *rows(params, seed=s)])[1] for s in range(50)]
    assert alone == beside and len(set(alone)) > 1


def test_a_flat_row_widens_alone_and_every_row_draws_as_it_would_alone() -> None:
    """A row whose nucleus is wider than the first candidates sits between peaked rows: each
    row's seeded draws equal its draws alone, and the flat row still reaches its whole nucleus."""
    torch.manual_seed(0)
    logits = torch.randn(3, 3000) * 3
    logits[1] = 0.0  # flat: a nucleus of 2,700 tokens
    params = SamplingParams(temperature=1.0, top_p=0.9)
    for row in range(3):
        alone = [_sample(logits[row : row + 1], rows(params, seed=s))[0] for s in range(300)]
        batched = [
            _sample(logits, [rows(params, seed=s)[0] if i == row else rows(params, seed=99)[0]
                             for i in range(3)])[row]
            for s in range(300)
        ]  # fmt: skip
        assert alone == batched
    flat = {_sample(logits, rows(params, params, params, seed=s))[1] for s in range(300)}
    assert len(flat) > CANDIDATES


def arrival(tokens: int, seed: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(prompt_tokens=tokens, params=SamplingParams(seed=seed))


def test_arrivals_prefill_in_groups_of_similar_length() -> None:
    """Prompts within twice the shortest of a group share a forward pass; longer ones start a
    new group, no group passes PREFILL_TOKENS, and a seeded request is prefilled alone."""
    streams = [arrival(n) for n in (40, 900, 45, 70, 3000, 2000, 30)]
    groups = prefill_groups(streams)  # type: ignore[arg-type]
    assert [[s.prompt_tokens for s in g] for g in groups] == [
        [30, 40, 45],
        [70],
        [900],
        [2000],
        [3000],
    ]
    many = [arrival(1000) for _ in range(9)]
    assert [len(g) for g in prefill_groups(many)] == [4, 4, 1]  # type: ignore[arg-type]
    mixed = [arrival(40), arrival(41, seed=1), arrival(42), arrival(43, seed=2), arrival(44)]
    groups = prefill_groups(mixed)  # type: ignore[arg-type]
    assert [[s.prompt_tokens for s in g] for g in groups] == [[40], [41], [42], [43], [44]]


def test_a_long_batch_always_steps_in_parts(
    base: ServingVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found with bench/abuse.py: a long batch stepped whole (0.9-2.0 s for a 2,315-token
    prompt's chunk on 2 cores) whenever no short batch had a timed step yet, so a chat arriving
    then, or one whose first step had not been timed, waited for all of it. Long batches are
    stepped in parts from their first step on, whoever else is there."""
    import app.engine.scheduler as engine_module
    from app.engine.batch import Batch

    monkeypatch.setattr(engine_module, "SHORT_REACH", 40)  # the tiny model's context is 512
    steps: list[tuple[bool, float | None]] = []
    real_step = Batch.step

    def recorded(batch: Batch, *args: Any, **kwargs: Any) -> Any:
        streams = [
            *(row.stream for row in batch.rows), *(row.stream for row, _ in batch.pending),
            *batch.deferred,
        ]  # fmt: skip
        part = kwargs.get("part_seconds", args[1] if len(args) > 1 else None)
        steps.append((any(stream.reach > 40 for stream in streams), part))
        return real_step(batch, *args, **kwargs)

    monkeypatch.setattr(Batch, "step", recorded)
    registry = ModelRegistry()
    registry.activate(base)
    engine = Engine(registry, limits=EngineLimits(max_batch=8, prefill_chunk=16))
    engine.start()
    try:
        long = submit(engine, " ".join(["river"] * 60), max_new_tokens=8, temperature=0)
        assert long.result(60).finish_reason == "length"
        chat = submit(engine, "Hi", max_new_tokens=4, temperature=0)
        late = submit(engine, " ".join(["stone"] * 60), max_new_tokens=8, temperature=0)
        assert chat.result(60).text and late.result(60).finish_reason == "length"
    finally:
        engine.stop()
    long_parts = [part for long, part in steps if long]
    assert long_parts and all(part is not None and part > 0 for part in long_parts)


def test_a_failure_of_the_generation_loop_ends_its_requests_and_the_loop_goes_on(
    base: ServingVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: an exception outside a step's own handling (here in admission, with a
    request decoding and another just taken) ended the generation thread, and every request it
    held waited forever (a stream hung until its client gave up). They now fail with
    EngineStopped (a 503 to clients) and the loop starts again for the next requests."""
    from app.engine.batch import Batch
    from app.engine.requests import EngineStopped

    registry = ModelRegistry()
    registry.activate(base)
    engine = Engine(registry, max_batch=8)
    real_footprint = Batch.footprint
    broken = threading.Event()

    def footprint(batch: Batch, *args: Any, **kwargs: Any) -> int:
        if broken.is_set():
            broken.clear()
            raise RuntimeError("a bug in admission")
        return real_footprint(batch, *args, **kwargs)

    monkeypatch.setattr(Batch, "footprint", footprint)
    engine.start()
    try:
        running = submit(engine, "Tell me a story.", max_new_tokens=200, temperature=0)
        next(iter(running))  # decoding
        broken.set()
        with pytest.raises(EngineStopped):
            running.result(30)
        after = submit(engine, "Hello", max_new_tokens=4, temperature=0)
        assert after.result(30).finish_reason in ("length", "stop")
    finally:
        engine.stop()
