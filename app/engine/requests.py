"""What a request to the engine is: its sampling parameters, its stream, its answer, its errors."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Hashable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

import torch

from app.engine.handoff import STEP, Outbox
from app.engine.registry import ServingVersion


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
    """The prompt (or the prompt plus the requested tokens) is more than this engine takes."""


class EngineBusy(RuntimeError):
    """More requests are waiting than the engine accepts; retry later."""


class OwnerBusy(EngineBusy):
    """The caller already has as many requests in the engine as one caller may."""


class EngineStopped(RuntimeError):
    """The engine is shutting down."""


class Lease(AbstractContextManager["Lease"]):
    """A version held for one request, from rendering its prompt to its last token: a swap
    meanwhile neither changes nor recycles it.

    Leaving its `with` block releases it, unless `Engine.submit` took it over: then the
    request releases it when it finishes.
    """

    def __init__(self, hold: AbstractContextManager[ServingVersion]) -> None:
        self._stack = ExitStack()
        self.version: ServingVersion = self._stack.enter_context(hold)
        self._taken = False

    def take(self) -> ExitStack:
        """What releases the version, handed over to the request that now holds it."""
        if self._taken:
            raise RuntimeError("this lease already holds a request's version")
        self._taken = True
        return self._stack.pop_all()

    def __exit__(self, *_: object) -> None:
        self._stack.close()  # nothing left to close once taken


@dataclass(eq=False)
class GenerationStream:
    """One request: iterate it for text as it is generated, or wait for `result()`."""

    version: ServingVersion
    input_ids: torch.Tensor
    params: SamplingParams
    _lease: ExitStack
    owner: Hashable | None = None
    """Who asked (an API key's id): the engine caps each owner's requests in flight."""
    kv_cost: int = 0
    """Bytes of KV cache this request reserves alone (set when the engine has a budget)."""
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

    @property
    def reach(self) -> int:
        """The most tokens this request's row can hold: its prompt and its longest answer."""
        return self.prompt_tokens + self.params.max_new_tokens

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
            outbox: Outbox | None = getattr(STEP, "outbox", None)
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
