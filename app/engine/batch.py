"""Continuous batching: the requests running on one version decode together, one token a step.

New requests are prefilled (together when they arrive together), then join the batch at the
next token boundary; a finished request leaves by dropping its row. A long prompt is prefilled
a chunk per step instead, so the running rows keep getting tokens while it arrives. A batch that
others wait for (long requests beside short ones, `app/engine/scheduler.py`) steps in parts: a
few layers of a chunk or of a decode step at a time. The KV cache and forward passes belong to
the batch's decoder (`app/engine/decoders.py`). Each row keeps its own sampling parameters
(tokens are drawn in `app/engine/sampling.py`), stop strings and random generator, so other
rows never shift a seeded request's random draws.

A seeded request is prefilled in a pass of its own, its whole prompt computed, never taken from
stored keys: run again, it repeats the same arithmetic and gives the same answer. Beside other
rows its logits can differ in the last bits (a batched product or sum may add in another order
than one row's), which can change a token; like OpenAI's `seed`, that part is best effort.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from app.engine.decoders import Step, decoder_for
from app.engine.llama.prefixes import Partial
from app.engine.sampling import _sample

if TYPE_CHECKING:
    from app.engine.registry import ServingVersion
    from app.engine.requests import Completion, GenerationStream

log = logging.getLogger(__name__)

_T = TypeVar("_T")

REPLACEMENT = "\ufffd"  # what a token ending inside a multi-byte character decodes to


class StopAwareText:
    """Accumulates decoded text, holding back what could still turn into a stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._hold = max((len(s) for s in stop), default=1) - 1

    def add(self, piece: str, final: bool) -> str:
        """Add decoded text; return what can be sent now."""
        if self.stopped:
            return ""
        self.text += piece
        cut = min((i for s in self.stop if (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            final = True
        ready = len(self.text) if final else max(self.sent, len(self.text) - self._hold)
        delta, self.sent = self.text[self.sent : ready], ready
        return delta


@dataclass(eq=False)
class Row:
    """One request in a batch: its tokens so far and what has been streamed."""

    stream: GenerationStream
    generator: torch.Generator | None
    """Seeded per request when it asked for a seed; otherwise the shared default generator."""
    tokens: list[int] = field(default_factory=list)
    decoded: str = ""
    """Text decoded so far that was handed to the stop-string filter."""
    finish: str | None = None

    def __post_init__(self) -> None:
        self.text = StopAwareText(self.stream.params.stop)

    @classmethod
    def of(cls, stream: GenerationStream) -> Row:
        """A new row for a request, with its own generator when it asked for a seed."""
        seed = stream.params.seed
        return cls(stream, torch.Generator().manual_seed(seed) if seed is not None else None)


def _parts(seconds: float, per_layer: float | None) -> int:
    """Layers that take about `seconds` at `per_layer` seconds each (one while unknown)."""
    return 1 if per_layer is None else max(1, int(seconds / per_layer))


PREFILL_TOKENS = 4096
"""Most tokens, padding included, prefilled in one forward pass."""
PREFILL_CHUNK = 256
"""Prompts longer than this are prefilled at most this many tokens a step, between decode
steps, so that a long prompt delays the running rows' next tokens by one chunk at a time, not
by all of it (an engine's `prefill_chunk` overrides it)."""
MIN_CHUNK = 16
"""Fewest tokens a chunk computes, however short the time it is given."""


def prefill_groups(streams: list[GenerationStream]) -> list[list[GenerationStream]]:
    """Requests to prefill together: by prompt length, so that padding stays under half of a
    group's tokens and a group stays under PREFILL_TOKENS; a seeded request alone."""
    groups: list[list[GenerationStream]] = []
    for stream in sorted(streams, key=lambda s: s.prompt_tokens):
        group = groups[-1] if groups else None
        width = stream.prompt_tokens
        if (
            group is None
            or stream.params.seed is not None
            or group[0].params.seed is not None
            or (len(group) + 1) * width > PREFILL_TOKENS
            or width > 2 * group[0].prompt_tokens
        ):
            groups.append([stream])
        else:
            group.append(stream)
    return groups


class Batch:
    """The requests decoding together on one version."""

    def __init__(self, version: ServingVersion, chunk: int = PREFILL_CHUNK) -> None:
        self.version = version
        self.chunk = chunk
        """Prompts longer than this are prefilled this many tokens a step."""
        self.rows: list[Row] = []
        self.decoder = decoder_for(version)
        self.next_tokens: list[int] = []
        self.pending: list[tuple[Row, Partial]] = []
        """Long prompts being prefilled a chunk a step, oldest first."""
        self.deferred: list[GenerationStream] = []
        """Requests that arrived during a decode step run in parts; they join after it."""
        self.decode_seconds = 0.0
        """How long the latest whole decode step took (0 when no row is decoding)."""
        self._prefill_rate: float | None = None  # tokens a second, of the latest chunk
        self._decoding: Step | None = None  # a decode step run in parts, not done yet
        self._decoding_seconds = 0.0  # its parts' time so far
        self._layer_seconds: float | None = None  # a part's time per layer, latest
        self._chunk_next = True  # in parts, chunks and decode steps take turns
        self._chunking: tuple[Row, Partial, Step] | None = None  # a chunk run in parts
        self._chunk_layer_seconds: float | None = None  # a chunk part's time per layer, latest

    def __len__(self) -> int:
        return len(self.rows) + len(self.pending) + len(self.deferred)

    @property
    def _busy(self) -> bool:
        """A decode step or a chunk is under way in parts: the rows and prompts stay as they are."""
        return self._decoding is not None or self._chunking is not None

    def footprint(self, reach: list[int] | None = None, chunked: list[int] | None = None) -> int:
        """The most bytes the decoder's KV cache can take with the batch's requests (deferred
        ones included) and new ones of these reaches and chunked prompt lengths."""
        waiting = [s.reach for s in self.deferred]
        long = [s.prompt_tokens for s in self.deferred if s.prompt_tokens > self.chunk]
        return self.decoder.footprint([*waiting, *(reach or [])], [*long, *(chunked or [])])

    def admit(self, streams: list[GenerationStream]) -> None:
        """Prefill requests that arrived together and add them to the batch (a request done at
        once leaves in `step`); if a prefill fails, its requests finish with the error. Long
        prompts only start here: `step` prefills them a chunk at a time. During a decode step
        run in parts, they wait for it to end."""
        if self._busy:
            self.deferred += streams
            return
        long = [stream for stream in streams if stream.prompt_tokens > self.chunk]
        for stream in long:
            seeded = stream.params.seed is not None
            try:
                prompt = stream.input_ids[0]
                partial = self.decoder.begin(prompt, reuse=not seeded, reach=stream.reach)
            except Exception as exc:  # the others go on
                log.exception("starting a prefill failed")
                stream._finish(None, exc)
                continue
            self.pending.append((Row.of(stream), partial))
        streams = [stream for stream in streams if stream.prompt_tokens <= self.chunk]
        for group in prefill_groups(streams):
            rows = [Row.of(stream) for stream in group]
            try:
                seeded = group[0].params.seed is not None  # then alone: see the module's doc
                prompts, reach = [s.input_ids[0] for s in group], [s.reach for s in group]
                logits = self.decoder.prefill(prompts, reuse=not seeded, reach=reach)
                firsts = _sample(logits, rows)
            except Exception as exc:  # the batch goes on without them
                log.exception("prefill failed")
                for stream in group:
                    stream._finish(None, exc)
                continue
            self.rows += rows
            self.next_tokens += firsts
            for row, first in zip(rows, firsts, strict=True):
                self._accept(row, first)

    def step(
        self, prefill_seconds: float | None = None, part_seconds: float | None = None
    ) -> list[tuple[Row, Completion]]:
        """Prefill one chunk of the oldest long prompt (sized to take about `prefill_seconds`
        when given: the others' next tokens wait for it), then decode one token for every row
        that is still going; returns the rows that finished.

        With `part_seconds` (other batches' rows wait for this one), a step is one piece of
        that work taking about this long: the next layers of a chunk or of a decode step, the
        two taking turns; requests arriving meanwhile join once the chunk or step is done.
        """
        if self._chunking is not None:  # whole once nobody waits for it
            self._chunk_part(part_seconds)
            if part_seconds is not None:
                return self._collect()
        done: list[tuple[Row, Completion]] = []
        if self._decoding is None:
            if self.deferred:
                deferred, self.deferred = self.deferred, []
                self.admit(deferred)
            done += self._collect()
            if self.pending and (part_seconds is None or self._chunk_next or not self.rows):
                self._chunk_next = False
                if part_seconds is None:
                    return self._advance(prefill_seconds) + done + self._decode(None)
                done += self._begin_chunk()
                if self._chunking is not None:
                    self._chunk_part(part_seconds)
                return done + self._collect()
        return done + self._decode(part_seconds)

    def _decode(self, part_seconds: float | None) -> list[tuple[Row, Completion]]:
        """A decode step for every row, or (`part_seconds`) its next layers taking about that
        long; the rows that finished."""
        done = self._collect()
        if self._decoding is None:
            if not self.rows:
                self.decode_seconds = 0.0
                return done
            self._decoding = self.decoder.start_decode(self.next_tokens)
            self._decoding_seconds = 0.0
        decoding = self._decoding
        layers = None if part_seconds is None else _parts(part_seconds, self._layer_seconds)
        started, before = time.perf_counter(), decoding.left
        logits = decoding.run(layers)
        elapsed = time.perf_counter() - started
        self._decoding_seconds += elapsed
        self._layer_seconds = elapsed / max(1, before - decoding.left)
        if logits is None:
            return done
        self._decoding, self._chunk_next = None, True
        self.decode_seconds = self._decoding_seconds
        self.next_tokens = _sample(logits, self.rows)
        for row, token in zip(self.rows, self.next_tokens, strict=True):
            self._accept(row, token)
        return done + self._collect()

    def _chunk(self, row: Row, seconds: float | None) -> int:
        """Tokens of the next chunk: the most, unless it should take only `seconds`. Always
        MIN_CHUNK for a seeded request: other chunk sizes would add in another order, and its
        answer must not depend on the traffic beside it when it was prefilled."""
        if row.stream.params.seed is not None:
            return MIN_CHUNK
        if seconds is None:
            return self.chunk
        if self._prefill_rate is None:
            return MIN_CHUNK
        return max(MIN_CHUNK, min(self.chunk, int(self._prefill_rate * seconds)))

    def _drop_cancelled(self) -> list[tuple[Row, Completion]]:
        """Long prompts whose requests were cancelled leave, done."""
        done = []
        for row, partial in list(self.pending):
            if row.stream.cancelled:
                self.pending.remove((row, partial))
                self.decoder.drop(partial)
                done.append((row, row.stream.completion("", 0, "cancelled")))
        return done

    def _advance(self, seconds: float | None) -> list[tuple[Row, Completion]]:
        """One chunk of the oldest long prompt still wanted; a prompt done joins the rows."""
        done = self._drop_cancelled()
        if not self.pending:
            return done
        row, partial = self.pending[0]
        chunk, left, started = self._chunk(row, seconds), partial.left, time.perf_counter()
        logits = self._guarded(row, partial, lambda: self.decoder.advance(partial, chunk))
        self._prefill_rate = min(chunk, left) / (time.perf_counter() - started)
        if logits is not None:
            self._join(row, partial, logits)
        return done

    def _begin_chunk(self) -> list[tuple[Row, Completion]]:
        """In parts: the oldest long prompt's next chunk as a step (`_chunking`); its last
        MIN_CHUNK tokens or fewer make the step in which it joins the rows."""
        done = self._drop_cancelled()
        if not self.pending:
            return done
        row, partial = self.pending[0]
        seeded = row.stream.params.seed is not None  # the same chunks as ever: see `_chunk`
        tokens = MIN_CHUNK if seeded else min(self.chunk, partial.left - MIN_CHUNK)
        if partial.left <= MIN_CHUNK or tokens <= 0:
            tokens = partial.left  # the last ones: it joins the rows once they are computed
        chunk = self._guarded(row, partial, lambda: self.decoder.start_chunk(partial, tokens))
        if chunk is not None:
            self._chunking = (row, partial, chunk)
        return done

    def _chunk_part(self, seconds: float | None) -> None:
        """The next layers of the chunk being computed, taking about `seconds` (None: all)."""
        assert self._chunking is not None
        row, partial, chunk = self._chunking
        layers = None if seconds is None else _parts(seconds, self._chunk_layer_seconds)
        before = chunk.left
        started = time.perf_counter()
        logits = self._guarded(row, partial, lambda: chunk.run(layers))
        self._chunk_layer_seconds = (time.perf_counter() - started) / max(1, before - chunk.left)
        if row.stream._done.is_set() or not chunk.left:  # it failed, or the chunk is done
            self._chunking = None
        if logits is not None:  # the prompt is whole (a decoder without chunks)
            self._join(row, partial, logits)

    def _guarded(self, row: Row, partial: Partial, compute: Callable[[], _T]) -> _T | None:
        """`compute()` for a long prompt; if it fails, the prompt leaves with the error and the
        batch goes on without it."""
        try:
            return compute()
        except Exception as exc:
            log.exception("prefill failed")
            self.pending.remove((row, partial))
            self.decoder.drop(partial)
            row.stream._finish(None, exc)
            return None

    def _join(self, row: Row, partial: Partial, logits: torch.Tensor) -> None:
        """A long prompt is whole: it joins the rows with its first token."""
        self.pending.remove((row, partial))
        try:
            first = _sample(logits, [row])[0]
        except Exception as exc:
            log.exception("sampling a first token failed")
            self.decoder.drop(partial)
            row.stream._finish(None, exc)
            return
        self.rows.append(row)
        self.next_tokens.append(first)
        self._accept(row, first)

    def fail(self, error: BaseException) -> None:
        """Finish every row with an error (a step raised); the batch is empty afterwards."""
        for row in [*self.rows, *(row for row, _ in self.pending)]:
            row.stream._finish(None, error)
        for stream in self.deferred:
            stream._finish(None, error)
        self.rows, self.next_tokens, self.pending, self.deferred = [], [], [], []
        self.decoder, self._decoding, self._chunking = decoder_for(self.version), None, None

    def _accept(self, row: Row, token: int) -> None:
        """Record a sampled token for a row: stream new text, and decide whether it is done."""
        tokenizer = self.version.tokenizer
        params = row.stream.params
        row.tokens.append(token)
        eos = token == tokenizer.eos_token_id
        text = str(tokenizer.decode(row.tokens, skip_special_tokens=True))
        last = eos or len(row.tokens) >= params.max_new_tokens or row.stream.cancelled
        if not text.endswith(REPLACEMENT) or last:
            delta = row.text.add(text[len(row.decoded) :], final=last)
            row.decoded = text
            if delta:
                row.stream._put(delta)
        if row.stream.cancelled:
            row.finish = "cancelled"
        elif eos or row.text.stopped:
            row.finish = "stop"
        elif len(row.tokens) >= params.max_new_tokens:
            row.finish = "length"

    def _collect(self) -> list[tuple[Row, Completion]]:
        """Take finished rows out of the batch, with their completions."""
        finished = [row for row in self.rows if row.finish is not None]
        if not finished:
            return []
        keep = [i for i, row in enumerate(self.rows) if row.finish is None]
        done = []
        for row in finished:
            completion = row.stream.completion(row.text.text, len(row.tokens), str(row.finish))
            done.append((row, completion))
        self.rows = [self.rows[i] for i in keep]
        self.next_tokens = [self.next_tokens[i] for i in keep]
        self.decoder.keep(keep)
        return done
