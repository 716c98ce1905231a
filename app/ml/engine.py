"""Text generation: one loop per process takes requests from a bounded queue and streams tokens.

Requests hold a lease on the version they were rendered for from `submit` until they finish, so
a swap never changes the weights under them. The loop batches the requests running on each
version (continuous batching, `app/ml/batching.py`): new ones join between steps, finished ones
leave, and a swap only means new requests go to another batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

import torch

from app.ml.batching import Batch
from app.ml.registry import ModelRegistry, ServingVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one answer."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens."""
    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 0.95
    """Nucleus sampling mass, in (0, 1]."""
    seed: int | None = None
    """Makes sampling reproducible for the same prompt, parameters and version."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings; it is not part of the answer."""


@dataclass(frozen=True)
class Completion:
    """What the model produced for one prompt, and which version produced it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """`stop` (the model ended or a stop string came), `length` (max_new_tokens), `cancelled`."""
    version: ServingVersion
    latency_ms: int


class PromptTooLong(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's context of {context_length} tokens"
        )


class EngineBusy(RuntimeError):
    """More requests are waiting than the engine accepts; retry later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down."""


@dataclass(eq=False)
class GenerationStream:
    """One request: iterate it for text as it is generated, or wait for `result()`."""

    version: ServingVersion
    input_ids: torch.Tensor
    params: SamplingParams
    _lease: ExitStack
    _deltas: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _done: threading.Event = field(default_factory=threading.Event)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _completion: Completion | None = None
    _error: BaseException | None = None
    _submitted: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _handoff: asyncio.Queue[str | None] | None = None

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the rendered prompt."""
        return int(self.input_ids.shape[1])

    def cancel(self) -> None:
        """Stop generating as soon as possible (a client went away); frees the engine."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether `cancel` was called."""
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        """Text deltas in order, until the answer is complete."""
        while (delta := self._deltas.get()) is not None:
            yield delta

    def next_delta(self, timeout: float | None = None) -> str | None:
        """The next piece of text, or None once the answer is complete."""
        return self._deltas.get(timeout=timeout)

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas for an event loop: handed over by the generation thread directly,
        without a worker thread per request waiting on a queue."""
        loop = asyncio.get_running_loop()
        handoff: asyncio.Queue[str | None] = asyncio.Queue()
        with self._lock:
            while True:
                try:
                    handoff.put_nowait(self._deltas.get_nowait())
                except queue.Empty:
                    break
            self._loop, self._handoff = loop, handoff
        while (delta := await handoff.get()) is not None:
            yield delta

    def _put(self, delta: str | None) -> None:
        with self._lock:
            if self._loop is None or self._handoff is None:
                self._deltas.put(delta)
                return
            outbox: Outbox | None = getattr(_STEP, "outbox", None)
            if outbox is not None:
                outbox.add(self._loop, self._handoff, delta)
                return
            # RuntimeError: the event loop is gone (shutdown), so nobody is listening.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._handoff.put_nowait, delta)

    def result(self, timeout: float | None = None) -> Completion:
        """The whole answer, once generated."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion

    def completion(self, text: str, completion_tokens: int, finish_reason: str) -> Completion:
        """What this request produced, timed from its submission."""
        return Completion(
            text=text, prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
            finish_reason=finish_reason, version=self.version,
            latency_ms=round((time.perf_counter() - self._submitted) * 1000),
        )  # fmt: skip

    def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        self._completion, self._error = completion, error
        self._lease.close()  # the version may be recycled from here on
        self._put(None)
        self._done.set()


_STEP = threading.local()  # the generation thread's outbox while it runs a step


class Outbox:
    """Deltas for event loops, handed over once per step.

    Waking an event loop once per request and token made the loop's thread compete with the
    matrix products for the two cores at every token of every stream; one wake-up per step
    carries all of a step's deltas.
    """

    def __init__(self) -> None:
        self._pending: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[str | None], str | None]]
        ] = {}

    def add(
        self, loop: asyncio.AbstractEventLoop, handoff: asyncio.Queue[str | None], delta: str | None
    ) -> None:
        """Queue a delta for a stream's event loop."""
        self._pending.setdefault(loop, []).append((handoff, delta))

    def flush(self) -> None:
        """Hand every queued delta to its event loop: one wake-up per loop."""
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            # RuntimeError: the event loop is gone (shutdown), so nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue[str | None], str | None]]) -> None:
    for handoff, delta in items:
        handoff.put_nowait(delta)


class Engine:
    """The generation loop of one process: a bounded queue in front of the model."""

    def __init__(self, registry: ModelRegistry, max_waiting: int = 64, max_batch: int = 32) -> None:
        self.registry = registry
        self.max_batch = max_batch
        """Requests decoding together at most; more wait in the queue."""
        self.max_waiting = max_waiting
        """Requests allowed to wait; beyond, `submit` raises EngineBusy instead of queueing."""
        self._queue: queue.Queue[GenerationStream | None] = queue.Queue(maxsize=max_waiting)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start the generation loop."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop after its current step; waiting and running requests fail with
        EngineStopped (their clients get a 503)."""
        self._stopping.set()
        while True:
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                waiting._finish(None, EngineStopped("the service is shutting down"))
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    @property
    def waiting(self) -> int:
        """Requests queued and not started."""
        return self._queue.qsize()

    def chat_prompt(
        self, messages: list[dict[str, str]] | str, version: ServingVersion | None = None
    ) -> str:
        """The exact prompt text for a conversation (or one user turn), by the chat template."""
        tokenizer = (version or self.registry.active).tokenizer
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(rendered)

    def submit(
        self,
        render: Callable[[ServingVersion], str],
        params: SamplingParams,
        lease: AbstractContextManager[ServingVersion] | None = None,
    ) -> tuple[GenerationStream, str]:
        """Queue a request; returns its stream and the exact prompt it will run on.

        `render` makes the prompt for the leased version (default: the active one). Raises
        PromptTooLong or EngineBusy at once, holding nothing.
        """
        if self._stopping.is_set():
            raise EngineStopped("the service is shutting down")
        stack = ExitStack()
        try:
            version = stack.enter_context(lease or self.registry.lease())
            prompt = render(version)
            # The chat template already carries the special tokens; adding more would change it.
            input_ids = version.tokenizer(
                prompt, add_special_tokens=False, return_tensors="pt"
            ).input_ids
            prompt_tokens = int(input_ids.shape[1])
            if prompt_tokens + params.max_new_tokens > version.context_length:
                raise PromptTooLong(prompt_tokens, params.max_new_tokens, version.context_length)
            stream = GenerationStream(version, input_ids, params, stack)
            self._queue.put_nowait(stream)
        except queue.Full:
            stack.close()
            raise EngineBusy(
                f"{self.max_waiting} requests are already waiting for the model; retry shortly"
            ) from None
        except BaseException:
            stack.close()
            raise
        return stream, prompt

    def generate(
        self, prompt: str, params: SamplingParams, version: ServingVersion | None = None
    ) -> Completion:
        """Generate one answer to a rendered prompt and wait for it (tests and benchmarks)."""
        lease = _Held(version) if version is not None else None
        stream, _ = self.submit(lambda _: prompt, params, lease)
        self.start()
        return stream.result()

    def _loop(self) -> None:
        _STEP.outbox = outbox = Outbox()
        try:
            self._run(outbox)
        finally:
            outbox.flush()
            _STEP.outbox = None

    def _run(self, outbox: Outbox) -> None:
        batches: dict[ServingVersion, Batch] = {}  # one per version: swaps never mix weights
        while not self._stopping.is_set():
            running = sum(len(batch) for batch in batches.values())
            arrivals: list[GenerationStream] = []
            try:
                # Idle: sleep until a request comes. Busy: take what is there, between steps.
                first = self._queue.get() if running == 0 else self._queue.get_nowait()
                if first is None:
                    break
                arrivals.append(first)
                while running + len(arrivals) < self.max_batch:
                    more = self._queue.get_nowait()
                    if more is None:
                        self._stopping.set()
                        break
                    arrivals.append(more)
            except queue.Empty:
                pass
            joining: dict[ServingVersion, list[GenerationStream]] = {}
            for stream in arrivals:
                if stream.cancelled:
                    stream._finish(stream.completion("", 0, "cancelled"))
                else:
                    joining.setdefault(stream.version, []).append(stream)
            for version, streams in joining.items():
                batch = batches.setdefault(version, Batch(version))
                try:
                    batch.admit(streams)
                except Exception as exc:  # a failed prefill is handled inside: this is a bug
                    log.exception("admitting requests failed; the batch's requests fail")
                    batch.fail(exc)
                    for stream in streams:
                        if not stream._done.is_set():
                            stream._finish(None, exc)
            outbox.flush()  # first tokens go out before the step
            for version, batch in list(batches.items()):
                try:
                    for row, completion in batch.step():
                        row.stream._finish(completion)
                except Exception as exc:
                    log.exception("a decoding step failed; its requests fail")
                    batch.fail(exc)
                if not batch:
                    del batches[version]
            outbox.flush()
        for batch in batches.values():
            batch.fail(EngineStopped("the service is shutting down"))


class _Held(AbstractContextManager[ServingVersion]):
    """A lease on a version the caller already holds."""

    def __init__(self, version: ServingVersion) -> None:
        self.version = version

    def __enter__(self) -> ServingVersion:
        return self.version

    def __exit__(self, *_: object) -> None:
        return None
