"""Continuous batching: the requests running on one version decode together, one token a step.

A new request is prefilled alone (its prompt in one forward pass), then joins the batch at the
next token boundary: its KV cache is left-padded to the batch's length (or the batch's to its)
and concatenated along the batch dimension. A finished request leaves by dropping its row;
columns that became padding for every row are trimmed. Each row keeps its own sampling
parameters, stop strings and random generator, so a seeded request gives the same answer
whatever else runs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

if TYPE_CHECKING:
    from app.ml.engine import Completion, GenerationStream
    from app.ml.registry import ServingVersion

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


CANDIDATES = 256
"""Tokens first sorted per row for top-p; rows whose nucleus is wider get 8 times more, and so
on up to the whole vocabulary."""


def _sample(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """One token per row, with each row's temperature, top-p and generator (greedy at 0)."""
    picked = logits.argmax(dim=-1)
    sampling = [i for i, row in enumerate(rows) if row.stream.params.temperature > 0]
    if not sampling:
        return [int(t) for t in picked]
    index = torch.tensor(sampling)
    temperature = torch.tensor([rows[i].stream.params.temperature for i in sampling])
    top_p = torch.tensor([rows[i].stream.params.top_p for i in sampling])
    probs = torch.softmax(logits[index].float() / temperature[:, None], dim=-1)
    # Sorting the whole vocabulary for every row costs more than the rest of a step; the
    # nucleus almost always lies in the most likely few hundred tokens. Widening until every
    # row's candidates hold its top_p mass keeps the result exactly top-p.
    vocab, k = probs.shape[-1], min(CANDIDATES, probs.shape[-1])
    while True:
        candidates, order = probs.topk(k, dim=-1)
        if k == vocab or bool((candidates.sum(dim=-1) >= top_p).all()):
            break
        k = min(8 * k, vocab)
    # Keep the smallest prefix whose mass reaches top_p (always at least the first token).
    outside = candidates.cumsum(dim=-1) - candidates > top_p[:, None]
    cumulative = candidates.masked_fill(outside, 0.0).cumsum(dim=-1)
    # One uniform draw per row from its own generator, so a seeded row's tokens do not depend
    # on the rows beside it; the token is where the draw falls in the row's cumulative mass.
    draws = torch.stack([torch.rand((), generator=rows[i].generator) for i in sampling])
    threshold = (draws * cumulative[:, -1])[:, None]
    choice = torch.searchsorted(cumulative, threshold, right=True).clamp(max=k - 1)
    picked[index] = order.gather(1, choice).squeeze(1)
    return [int(t) for t in picked]


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the sequence dimension (-2 for cache tensors, -1 for masks) on the left with zeros."""
    dim = -2 if tensor.dim() == 4 else -1
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Batch:
    """The requests decoding together on one version."""

    def __init__(self, version: ServingVersion) -> None:
        self.version = version
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        """1 where a cache column holds a real token of that row, 0 for left padding."""
        self.next_tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, stream: GenerationStream) -> None:
        """Prefill a request and add it to the batch (a request done at once leaves in `step`)."""
        seed = stream.params.seed
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        row = Row(stream, generator)
        cache = DynamicCache(config=self.version.model.config)
        logits, cache = self._forward(input_ids=stream.input_ids, cache=cache)
        first = _sample(logits, [row])[0]
        prompt_mask = torch.ones_like(stream.input_ids)
        if self.cache is None:
            self.cache, self.mask = cache, prompt_mask
        else:
            length = max(self.mask.shape[1], prompt_mask.shape[1])
            merged = [
                (
                    torch.cat([_left_pad(k, length), _left_pad(k2, length)], dim=0),
                    torch.cat([_left_pad(v, length), _left_pad(v2, length)], dim=0),
                )
                for (k, v), (k2, v2) in zip(_layers(self.cache), _layers(cache), strict=True)
            ]
            self.cache = DynamicCache(ddp_cache_data=merged)
            self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(prompt_mask, length)])
        self.rows.append(row)
        self.next_tokens.append(first)
        self._accept(row, first)

    def step(self) -> list[tuple[Row, Completion]]:
        """Decode one token for every row that is still going; returns the rows that finished."""
        done = self._collect()
        if not self.rows:
            return done
        assert self.cache is not None
        inputs = torch.tensor(self.next_tokens)[:, None]
        mask = torch.cat([self.mask, torch.ones_like(inputs)], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True)
        logits, self.cache = self._forward(
            input_ids=inputs, attention_mask=mask, position_ids=positions, cache=self.cache
        )
        self.mask = mask
        self.next_tokens = _sample(logits, self.rows)
        for row, token in zip(self.rows, self.next_tokens, strict=True):
            self._accept(row, token)
        return done + self._collect()

    def _forward(self, **inputs: object) -> tuple[torch.Tensor, DynamicCache]:
        """Logits at each row's last position, and the updated cache."""
        model, head = self.version.model, self.version.head
        with torch.inference_mode():
            if head is None:
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                return out.logits[:, -1, :], out.cache
            out = model.base_model(**inputs, use_cache=True)
            return head(out.last_hidden_state[:, -1, :]), out.cache

    def fail(self, error: BaseException) -> None:
        """Finish every row with an error (a step raised); the batch is empty afterwards."""
        for row in self.rows:
            row.stream._finish(None, error)
        self.rows, self.cache, self.next_tokens = [], None, []

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
        if not self.rows:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return done
        assert self.cache is not None
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        # Columns that are padding for every remaining row only cost attention time.
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0])
        if start > 0:
            self.mask = self.mask[:, start:]
            trimmed = [(k[:, :, start:, :], v[:, :, start:, :]) for k, v in _layers(self.cache)]
            self.cache = DynamicCache(ddp_cache_data=trimmed)
        return done
