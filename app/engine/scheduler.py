"""The generation loop: one per process takes requests from a bounded queue and streams tokens.

A request's caller leases a version (`Engine.lease`), renders the prompt for it and submits
both; the request holds the lease until it finishes, so a swap never changes the weights under
it. The loop batches the requests running on each version (continuous batching,
`app/engine/batch.py`): new ones join between steps, finished ones leave, and a swap only means
new requests go to another batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from app.engine.batch import PREFILL_CHUNK, Batch
from app.engine.decoders import decoder_for
from app.engine.handoff import STEP, Outbox
from app.engine.registry import ModelRegistry, ServingVersion
from app.engine.requests import (
    Completion,
    EngineBusy,
    EngineStopped,
    GenerationStream,
    Lease,
    OwnerBusy,
    PromptTooLong,
    SamplingParams,
)

log = logging.getLogger(__name__)


SHORT_REACH = 1024
"""Requests that can hold at most this many tokens (prompt and answer) decode in a batch of
their own, apart from longer ones: a batch's KV cache is as wide as its longest row for every
row, so one long request beside many short ones would multiply their memory and attention."""

Lane = tuple[ServingVersion, bool]
"""Which batch a request decodes in: its version, and whether it is long (past SHORT_REACH)."""


def lane_of(stream: GenerationStream) -> Lane:
    """The batch a request joins."""
    return stream.version, stream.reach > SHORT_REACH


PREFILL_SHARE = 0.5
"""While requests are decoding, a step's chunk of a long prompt is sized to take about this
share of the latest decode steps' time: their next tokens wait that much longer, no more."""

LONG_SHARE = 0.3
"""While short requests are decoding, the long requests' batches get, between two of their
steps, a piece of their own work (a chunk of a prompt, or some layers of a decode step) taking
about this many times as long as those steps took: the short requests' time between tokens
grows by about that share (more on 2 cores, where the long rows' memory traffic slows the short
steps too), and long requests get about a quarter of the engine while chats decode, all of it
otherwise. At 1.0 one key's maximal prompts doubled the others' time between tokens."""

PART_SECONDS = 0.05
"""The short requests' step time assumed before one was timed: long batches run in pieces of
LONG_SHARE times the latest timed short step even while no short request decodes, so that one
arriving waits for a piece, not for a whole step of theirs (over a second for a 256-token chunk
of a long prompt on 2 cores), and a new short batch's first steps are not spent waiting."""

HEAD_WAIT = 2.0
"""Seconds the oldest waiting request may be passed over by later ones that fit the KV-cache
budget; after that nothing more is admitted until it fits, so a large request never starves."""


@dataclass(frozen=True)
class EngineLimits:
    """What one request, one owner and all requests together may take of the engine."""

    max_waiting: int = 64
    """Requests allowed to wait; beyond, `submit` raises EngineBusy instead of queueing."""
    max_batch: int = 32
    """Requests decoding together at most; more wait in the queue."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens, after the chat template (None: the model's context)."""
    kv_cache_bytes: int | None = None
    """Most bytes the KV caches of all running requests may take (None: no budget). A request
    waits until its row fits; one that cannot fit even alone is refused at once."""
    max_per_owner: int | None = None
    """Requests one owner may have waiting or running at once (None: no cap)."""
    kv_share_per_owner: float = 1.0
    """Share of `kv_cache_bytes` one owner's running requests may reserve; beyond, its next
    request waits (one request alone always may run). 1: no share of its own."""
    prefill_chunk: int = PREFILL_CHUNK
    """Prompts longer than this many tokens are prefilled this many a step, between decode
    steps of the running requests."""


def _fail_unfinished(streams: list[GenerationStream], error: BaseException) -> None:
    """Finish with `error` each of these requests that has not finished yet."""
    for stream in streams:
        if not stream._done.is_set():
            stream._finish(None, error)


class Engine:
    """The generation loop of one process: a bounded queue in front of the model."""

    def __init__(
        self,
        registry: ModelRegistry,
        max_waiting: int = 64,
        max_batch: int = 32,
        limits: EngineLimits | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits or EngineLimits(max_waiting=max_waiting, max_batch=max_batch)
        self.max_batch = self.limits.max_batch
        """Requests decoding together at most; more wait in the queue."""
        self.max_waiting = self.limits.max_waiting
        """Requests allowed to wait; beyond, `submit` raises EngineBusy instead of queueing."""
        self._waiting: deque[GenerationStream] = deque()
        self._wake = threading.Condition()
        self._owners: Counter[Hashable] = Counter()
        self._owner_kv: Counter[Hashable] = Counter()  # bytes reserved by running requests
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._in_hand: list[GenerationStream] = []  # taken from the queue, maybe in no batch yet
        self.kv_bytes = 0
        """Bytes the running requests' KV caches may take (their footprint, at admission)."""
        self.kv_allocated = 0
        """Bytes the running requests' KV caches hold, after the latest step."""
        self.kv_allocated_peak = 0
        """The most `kv_allocated` has been since the engine started."""

    def start(self) -> None:
        """Start the generation loop."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop after its current step; waiting and running requests fail with
        EngineStopped (their clients get a 503)."""
        self._stopping.set()
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
            self._wake.notify_all()
        for stream in waiting:
            stream._finish(None, EngineStopped("the service is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    @property
    def waiting(self) -> int:
        """Requests queued and not started."""
        return len(self._waiting)

    def check_admission(self, owner: Hashable | None = None) -> None:
        """Refuse at once what `submit` would refuse before any work: EngineStopped while
        stopping, OwnerBusy for an owner at its cap. Callers call it before they lease a
        version and render the prompt."""
        if self._stopping.is_set():
            raise EngineStopped("the service is shutting down")
        # Refused before its prompt is rendered and tokenized: a key retrying as fast as it may
        # took a third of a core in tokenizing long prompts only to be refused, and the
        # generation thread waited for the interpreter lock behind it.
        self._check_owner(owner)

    def lease(self, hold: AbstractContextManager[ServingVersion] | None = None) -> Lease:
        """The version a request will run on, held from rendering its prompt to its last
        token: `hold` (a version an admin named, say), by default the active one."""
        return Lease(hold or self.registry.lease())

    def submit(
        self,
        lease: Lease,
        prompt: str,
        params: SamplingParams,
        *,
        owner: Hashable | None = None,
    ) -> GenerationStream:
        """Queue a request: `prompt` is the exact text for the leased version (its chat
        template applied by the caller); it is tokenized here. Returns the request's stream.

        Takes the lease over: the request releases it when it finishes. Raises PromptTooLong,
        EngineBusy or OwnerBusy at once, releasing it.
        """
        stack = lease.take()
        try:
            self.check_admission(owner)  # before tokenizing, for callers that did not
            version = lease.version
            # The chat template already carries the special tokens; adding more would change it.
            input_ids = version.tokenizer(
                prompt, add_special_tokens=False, return_tensors="pt"
            ).input_ids
            stream = GenerationStream(version, input_ids, params, stack, owner)
            self._check(stream)
            with self._wake:
                if self._stopping.is_set():  # stop() empties the queue under this lock
                    raise EngineStopped("the service is shutting down")
                if len(self._waiting) >= self.max_waiting:
                    raise EngineBusy(
                        f"{self.max_waiting} requests are already waiting for the model; "
                        "retry shortly"
                    )
                if owner is not None and self.limits.max_per_owner is not None:
                    self._check_owner(owner)
                    self._owners[owner] += 1
                    stack.callback(self._release, owner)
                self._waiting.append(stream)
                self._wake.notify()
        except BaseException:
            stack.close()
            raise
        return stream

    def _check_owner(self, owner: Hashable | None) -> None:
        """OwnerBusy if this owner already has as many requests in the engine as one may."""
        cap = self.limits.max_per_owner
        if owner is not None and cap is not None and self._owners[owner] >= cap:
            raise OwnerBusy(
                f"this key already has {cap} generations in progress, the most one key may "
                "have (MAX_REQUESTS_PER_KEY); retry when one has finished"
            )

    def _check(self, stream: GenerationStream) -> None:
        """Refuse a request this engine could never run: PromptTooLong, with what to change."""
        version, params, tokens = stream.version, stream.params, stream.prompt_tokens
        limit = self.limits.max_prompt_tokens
        if limit is not None and tokens > limit:
            raise PromptTooLong(
                f"the prompt is {tokens} tokens (after the chat template); the limit is {limit} "
                "(MAX_PROMPT_TOKENS)"
            )
        if stream.reach > version.context_length:
            raise PromptTooLong(
                f"the prompt is {tokens} tokens; with max_new_tokens={params.max_new_tokens} "
                f"that exceeds the model's context of {version.context_length} tokens"
            )
        budget = self.limits.kv_cache_bytes
        if budget is not None:
            alone = decoder_for(version).footprint([stream.reach], self._chunked(stream))
            stream.kv_cost = alone
            if alone > budget:
                raise PromptTooLong(
                    f"the prompt is {tokens} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"its keys and values need {alone / 2**20:.0f} MiB, more than the "
                    f"{budget / 2**20:.0f} MiB all requests share (KV_CACHE_BYTES): shorten the "
                    "prompt or ask for fewer tokens"
                )

    def _chunked(self, stream: GenerationStream) -> list[int]:
        """The prompt's length when it will be prefilled in chunks (into a buffer of its own)."""
        return [stream.prompt_tokens] if stream.prompt_tokens > self.limits.prefill_chunk else []

    def _release_kv(self, owner: Hashable, cost: int) -> None:
        with self._wake:
            self._owner_kv[owner] -= cost
            if self._owner_kv[owner] <= 0:
                del self._owner_kv[owner]

    def _release(self, owner: Hashable) -> None:
        with self._wake:
            self._owners[owner] -= 1
            if self._owners[owner] <= 0:
                del self._owners[owner]

    def generate(
        self, prompt: str, params: SamplingParams, version: ServingVersion | None = None
    ) -> Completion:
        """Generate one answer to a rendered prompt and wait for it (tests and benchmarks)."""
        with self.lease(nullcontext(version) if version is not None else None) as lease:
            stream = self.submit(lease, prompt, params)
        self.start()
        return stream.result()

    def _loop(self) -> None:
        STEP.outbox = outbox = Outbox()
        try:
            while not self._stopping.is_set():
                batches: dict[Lane, Batch] = {}
                try:
                    self._run(outbox, batches)
                except Exception:  # a bug outside a step's own handling: the loop goes on
                    log.exception("the generation loop failed; its requests fail, it restarts")
                    failure = EngineStopped("the model failed on this request; retry")
                    for batch in batches.values():
                        batch.fail(failure)
                    _fail_unfinished(self._in_hand, failure)
                    outbox.flush()
                    self._stopping.wait(0.1)  # a failure at every turn must not spin a core
        finally:
            outbox.flush()
            STEP.outbox = None

    def _admit(self, batches: dict[Lane, Batch]) -> list[GenerationStream]:
        """Take the waiting requests that fit now: batch slots and the KV-cache budget, oldest
        first; sleeps while nothing runs and nothing waits."""
        budget = self.limits.kv_cache_bytes
        with self._wake:
            running = sum(len(batch) for batch in batches.values())
            while running == 0 and not self._waiting and not self._stopping.is_set():
                self._wake.wait()
            taken: list[GenerationStream] = []
            self._in_hand = taken  # failed, should the loop fail before they are in a batch
            joining: dict[Lane, tuple[list[int], list[int]]] = {}  # reaches, chunked lengths
            footprints = {lane: b.footprint() for lane, b in batches.items()}
            now = time.perf_counter()
            admitted, full = 0, False
            # While rows decode, the prompts prefilled whole between two steps are held to
            # about one chunk's tokens: many short prompts arriving at once would otherwise
            # stall every running row for their whole prefill.
            prefill_room = self.limits.prefill_chunk if running else None
            for stream in list(self._waiting):
                if stream.cancelled:  # finished at once, taking no slot
                    self._waiting.remove(stream)
                    taken.append(stream)
                    continue
                if full or running + admitted >= self.max_batch:
                    continue
                whole = not self._chunked(stream)
                room = prefill_room
                if whole and room is not None and stream.prompt_tokens > room and admitted:
                    continue  # the next step's turn (the first one taken always fits)
                if budget is not None:
                    owner, share = stream.owner, self.limits.kv_share_per_owner
                    held = self._owner_kv.get(owner, 0) if owner is not None else 0
                    if held and held + stream.kv_cost > share * budget:
                        continue  # this owner's share is taken: the others go first
                    lane = lane_of(stream)
                    batch = batches.get(lane)
                    reach, chunked = joining.get(lane, ([], []))
                    reach, chunked = [*reach, stream.reach], [*chunked, *self._chunked(stream)]
                    if batch is not None:
                        after = batch.footprint(reach, chunked)
                    else:
                        after = decoder_for(stream.version).footprint(reach, chunked)
                    if sum(footprints.values()) - footprints.get(lane, 0) + after > budget:
                        # The oldest has waited long enough: room is kept for it.
                        full = now - stream._submitted > HEAD_WAIT and stream is self._waiting[0]
                        continue
                    joining[lane], footprints[lane] = (reach, chunked), after
                    if owner is not None:
                        self._owner_kv[owner] += stream.kv_cost
                        stream._lease.callback(self._release_kv, owner, stream.kv_cost)
                self._waiting.remove(stream)
                taken.append(stream)
                admitted += 1
                if whole and prefill_room is not None:
                    prefill_room -= stream.prompt_tokens
            self.kv_bytes = sum(footprints.values())
            return taken

    def _run(self, outbox: Outbox, batches: dict[Lane, Batch]) -> None:
        # One batch per version (swaps never mix weights) and length (see SHORT_REACH).
        short_seconds = PART_SECONDS  # the latest timed step of the short batches together
        while not self._stopping.is_set():
            arrivals = self._admit(batches)
            if self._stopping.is_set():
                for stream in arrivals:  # taken from the queue after stop() emptied it
                    stream._finish(None, EngineStopped("the service is shutting down"))
                break
            joining: dict[Lane, list[GenerationStream]] = {}
            for stream in arrivals:
                if stream.cancelled:
                    stream._finish(stream.completion("", 0, "cancelled"))
                else:
                    joining.setdefault(lane_of(stream), []).append(stream)
            for lane, streams in joining.items():
                batch = batches.setdefault(lane, Batch(lane[0], self.limits.prefill_chunk))
                try:
                    batch.admit(streams)
                except Exception as exc:  # a failed prefill is handled inside: this is a bug
                    log.exception("admitting requests failed; the batch's requests fail")
                    batch.fail(exc)
                    _fail_unfinished(streams, exc)
            outbox.flush()  # first tokens go out before the step
            # Short requests (chats) step every time; long ones get a share of the time beside
            # them, in pieces (LONG_SHARE), so that they cannot stretch every chat's tokens.
            short = sum(b.decode_seconds for (_, long), b in batches.items() if not long)
            short_seconds = short if short > 0 else short_seconds
            for (version, long), batch in list(batches.items()):
                lane = (version, long)
                waits = short if short > 0 else batch.decode_seconds  # who waits for a chunk
                prefill_seconds = PREFILL_SHARE * waits if waits > 0 else None
                part_seconds = LONG_SHARE * short_seconds if long else None
                try:
                    for row, completion in batch.step(prefill_seconds, part_seconds):
                        row.stream._finish(completion)
                except Exception as exc:
                    log.exception("a decoding step failed; its requests fail")
                    batch.fail(exc)
                if not batch:
                    del batches[lane]
            outbox.flush()
            self.kv_allocated = sum(batch.decoder.allocated for batch in batches.values())
            self.kv_allocated_peak = max(self.kv_allocated_peak, self.kv_allocated)
        for batch in batches.values():
            batch.fail(EngineStopped("the service is shutting down"))
