"""LlamaDecoder: a batch's rows on the Llama-family path; prefill, chunks and decode steps.

transformers' own forward is written for every model and every device; on a 2-core CPU three
of its choices cost most of a decode step (default model, bf16, measured on an AVX512-BF16
EPYC here):
- `F.linear` on bf16 weights goes through oneDNN, which reorders the weight on every call.
  Weights reordered once into oneDNN's blocked layout (`_reorder_linear_weight`) take about half
  the time (33 against 63 us for a 1536 x 576 layer at batch 1). Fusing q/k/v and gate/up into
  one product each also halves the number of calls. Where the weights already are 4-bit (the
  default model comes from a Q4_1 GGUF), a decode step reads a quarter of the bytes through
  torch's int4 kernel instead: 12.6 against 22.9 ms at batch 1, the same NLL. The base model
  is arranged once at start; versions built during a swap use their own weights, since packing
  a copy made swaps slower.
- bf16 attention through SDPA is slow on CPU: 1.0 ms a layer at batch 16 over 100 positions,
  against 0.15 ms in fp32. The KV cache here is fp32 and so is attention; only the weights'
  products run in the model's dtype.
- `DynamicCache` concatenates every layer's keys and values each step, and joining a request
  left-pads the whole cache. Here a batch's cache is one buffer per layer that grows by doubling;
  a step writes one column, a new request writes its rows, a finished one moves at most the
  rows after it.

Supported: Llama and Qwen2 architectures with full attention (no sliding window); anything else
runs on transformers' forward (`app/engine/decoders.py`). A test checks that both give the same
logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.engine.llama.kv_cache import KVCache, Room
from app.engine.llama.prefixes import MIN_REUSE, Partial, shared_start
from app.engine.llama.weights import LayerPass, LlamaWeights

SMALL_CHUNK = 32
"""Chunks of a long prompt up to this many tokens run on the decode weights."""


class LayerStep:
    """One decode step of a batch, or one chunk of a long prompt, run whole or a few layers at
    a time (`run`)."""

    def __init__(
        self, layers: LayerPass, finish: Callable[[torch.Tensor], torch.Tensor | None]
    ) -> None:
        self._pass, self._finish = layers, finish

    @property
    def layers(self) -> int:
        """Layers in the step."""
        return len(self._pass.layers)

    @property
    def left(self) -> int:
        """Layers still to compute."""
        return self._pass.left

    def run(self, layers: int | None = None) -> torch.Tensor | None:
        """Compute the next `layers` layers (all that are left by default); every row's logits
        once a decode step is done, None before (and always for a chunk)."""
        hidden = self._pass.run(layers)
        return None if hidden is None else self._finish(hidden)


class LlamaDecoder:
    """The rows of one batch: prefill adds rows, decode steps all of them."""

    def __init__(self, weights: LlamaWeights) -> None:
        self.weights = weights
        self.cache = KVCache(
            len(weights.layers), weights.kv_heads, weights.head_dim, weights.context_length,
            weights.kv_dtype,
        )  # fmt: skip
        self.partials: list[Partial] = []
        """Long prompts being prefilled a chunk at a time, not rows yet."""
        self._joining: tuple[Partial, Room] | None = None  # a prompt joining as a row, in parts

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return self.cache.rows

    def footprint(self, reach: list[int] | None = None, chunked: list[int] | None = None) -> int:
        """The most bytes the KV cache can take with its rows, plus new rows of these reaches
        and the buffers of new prompts of these lengths to prefill in chunks (a long prompt
        being prefilled counts twice: its own buffer, then its row)."""
        pending = [partial.reach for partial in self.partials]
        lengths = [len(p.prompt) for p in self.partials] + (chunked or [])
        buffers = self.cache.bytes_per_column * sum(lengths)
        return self.cache.footprint([*pending, *(reach or [])]) + buffers

    @property
    def allocated(self) -> int:
        """Bytes the KV cache holds now."""
        rows = sum(buffer.nbytes for buffer in (*self.cache.keys, *self.cache.values))
        return rows + sum(partial.nbytes for partial in self.partials)

    def begin(self, prompt: torch.Tensor, reuse: bool = True, reach: int | None = None) -> Partial:
        """Start prefilling a long prompt a chunk at a time (`advance`); with `reuse`, from the
        start it shares with a stored prompt."""
        layers, kv_heads, head_dim = self.cache.shape
        shape = (layers, kv_heads, len(prompt) - 1, head_dim)
        # Empty, not zeroed: a chunk reads only the columns it and the chunks before it wrote,
        # and zeroing a long prompt's buffers at once (over 100 MB) stalled a step.
        keys, values = (torch.empty(shape, dtype=self.cache.dtype) for _ in range(2))
        partial = Partial(prompt, reach or self.cache.limit, keys, values)
        if reuse:
            entry, shared = self.weights.prefixes.longest(prompt.tolist())
            if entry is not None:
                partial.keys[:, :, :shared] = entry.keys[:, :, :shared]
                partial.values[:, :, :shared] = entry.values[:, :, :shared]
                partial.done = shared
        self.partials.append(partial)
        return partial

    def advance(self, partial: Partial, tokens: int) -> torch.Tensor | None:
        """Compute up to `tokens` more of a partial prompt. Once at most `tokens` are left,
        they are computed as the prompt joins the batch as a row: the logits of its last token
        are returned then, None before."""
        return self.start_chunk(partial, min(tokens, partial.left)).run()

    def start_chunk(self, partial: Partial, tokens: int) -> LayerStep:
        """The next `tokens` of a partial prompt as a step to run a few layers at a time; it
        gives logits only where these are the prompt's last tokens: then the prompt joins the
        batch as a row once the step is done (`_start_join`). Nothing else may advance this
        prompt, nor change this decoder's rows, until the step is done."""
        if tokens >= partial.left:
            return self._start_join(partial)
        weights, start = self.weights, partial.done
        end = start + tokens
        # A query sees every key up to its own position: the stored ones and its chunk's.
        mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            partial.keys[layer, :, start:end] = k[0]
            partial.values[layer, :, start:end] = v[0]
            return F.scaled_dot_product_attention(
                q, partial.keys[layer, None, :, :end].to(q.dtype),
                partial.values[layer, None, :, :end].to(q.dtype), attn_mask=mask,
                scale=weights.scaling, enable_gqa=True,
            )  # fmt: skip

        def finish(hidden: torch.Tensor) -> None:
            partial.done = end

        # A small chunk is bound by reading the weights, like a decode step: it runs on the
        # decode weights (4-bit where they are), a large one on the model's own.
        layers = LayerPass(
            weights, partial.prompt[None, start:end], torch.arange(start, end)[None, :], attend,
            prefill=tokens > SMALL_CHUNK,
        )  # fmt: skip
        return LayerStep(layers, finish)

    def _start_join(self, partial: Partial) -> LayerStep:
        """A partial prompt's last tokens, computed as it joins the batch as a row: the row's
        room is made, and the prompt's stored keys copied into it, a layer at a time with the
        rest, so that a long prompt's joining (hundreds of MB of copies) can go in parts too."""
        cache, weights, store = self.cache, self.weights, self.weights.prefixes
        prompt, done, length, row = partial.prompt, partial.done, len(partial.prompt), cache.rows
        room = cache.room(row + 1, length, [partial.reach])
        self._joining = (partial, room)
        start = room.length - length  # the prompt ends where the batch's rows do
        mask = torch.arange(length)[None, :] <= torch.arange(done, length)[:, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            room.layer(layer)
            keys, values = cache.keys[layer], cache.values[layer]
            keys[row, :, start : start + done] = partial.keys[layer, :, :done]
            values[row, :, start : start + done] = partial.values[layer, :, :done]
            keys[row, :, start + done : room.length] = k[0]
            values[row, :, start + done : room.length] = v[0]
            # Every token's but the last, for the prefix store (which never gives the last).
            partial.keys[layer, :, done:] = k[0, :, :-1]
            partial.values[layer, :, done:] = v[0, :, :-1]
            return F.scaled_dot_product_attention(
                q, keys[row : row + 1, :, start : room.length].to(q.dtype),
                values[row : row + 1, :, start : room.length].to(q.dtype), attn_mask=mask,
                scale=weights.scaling, enable_gqa=True,
            )  # fmt: skip

        def finish(hidden: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                logits = weights.logits(hidden[:, -1, :])
            room.make()  # a no-op unless a layer was skipped
            cache.start = torch.cat([cache.start, torch.tensor([start])])
            cache.reach.append(partial.reach)
            partial.done, self._joining = length, None
            self.partials.remove(partial)
            tokens = prompt[:-1].tolist()
            if not store.covers(tokens):
                store.add(tokens, partial.keys, partial.values)
            return logits

        layers = LayerPass(
            weights, prompt[None, done:], torch.arange(done, length)[None, :], attend, prefill=True
        )
        return LayerStep(layers, finish)

    def drop(self, partial: Partial) -> None:
        """Stop prefilling a partial prompt (its request was cancelled, or it failed)."""
        if self._joining is not None and self._joining[0] is partial:
            self._joining[1].make()  # the rows must be whole again, without this one
            self._joining = None
        if partial in self.partials:
            self.partials.remove(partial)

    def prefill(
        self,
        prompts: list[torch.Tensor],
        reuse: bool = True,
        reach: list[int] | None = None,
    ) -> torch.Tensor:
        """Add one row per prompt (1-D token ids), prefilled together; logits of their last
        tokens. With `reuse`, the start a prompt shares with a recent one is taken from the
        prefix store; without, every prompt is computed whole (and still stored). `reach`: per
        prompt, the most tokens its row will hold (prompt and answer; default the context)."""
        cache, weights, store = self.cache, self.weights, self.weights.prefixes
        token_lists = [p.tolist() for p in prompts]
        if reuse and len(prompts) > 1:
            common = token_lists[0][: min(len(t) for t in token_lists) - 1]
            for tokens in token_lists[1:]:
                common = common[: shared_start(common, tokens)]
            if len(common) >= MIN_REUSE and not store.covers(common):
                # Prompts arriving together that start alike (a system prompt not seen yet):
                # that start is computed once, stored, and taken by each of them below.
                LlamaDecoder(weights).prefill([torch.tensor(common)])
        found = [store.longest(tokens) if reuse else (None, 0) for tokens in token_lists]
        reused = torch.tensor([n for _, n in found])
        lengths = torch.tensor([len(t) for t in token_lists])
        computed = lengths - reused
        width, span = int(computed.max()), int(lengths.max())
        group, old = len(prompts), cache.rows
        pad = width - computed
        input_ids = torch.zeros(group, width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, int(pad[i]) :] = prompt[int(reused[i]) :]
        reach = reach or [cache.limit] * group
        cache.room(old + group, span, reach).make()
        end = cache.length  # the prompts end where the batch's rows do
        starts = end - lengths
        rows = range(old, old + group)
        columns = torch.arange(width)
        positions = (columns[None, :] - pad[:, None] + reused[:, None]).clamp(min=0)
        for row, (entry, n), start in zip(rows, found, starts.tolist(), strict=True):
            if entry is not None:
                for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
                    keys[row, :, start : start + n] = entry.keys[layer, :, :n]
                    values[row, :, start : start + n] = entry.values[layer, :, :n]

        if bool(reused.any()):
            # A query sees its row's keys from the row's start up to itself, stored ones
            # included; a padding query also sees its own column, so no softmax is over nothing.
            query_columns = (end - width + columns)[:, None]
            key_columns = (end - span + torch.arange(span))[None, :]
            mask = (key_columns >= starts[:, None, None]) & (key_columns <= query_columns)
            mask = (mask | (key_columns == query_columns))[:, None]

            def attend(
                layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
            ) -> torch.Tensor:
                keys, values = cache.keys[layer], cache.values[layer]
                for i, row in enumerate(rows):  # only real columns: padding would overwrite
                    keys[row, :, end - int(computed[i]) : end] = k[i, :, int(pad[i]) :]
                    values[row, :, end - int(computed[i]) : end] = v[i, :, int(pad[i]) :]
                return F.scaled_dot_product_attention(
                    q, keys[old : old + group, :, end - span : end].to(q.dtype),
                    values[old : old + group, :, end - span : end].to(q.dtype), attn_mask=mask,
                    scale=weights.scaling, enable_gqa=True,
                )  # fmt: skip

        else:
            mask = None
            if bool(pad.any()):
                # Left padding: a real query sees real keys up to itself. A padding query sees
                # only itself, so its softmax is over a real number (-inf everywhere gives NaN).
                causal = columns[None, :] <= columns[:, None]
                real = columns[None, :] >= pad[:, None]
                mask = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
                mask = mask[:, None]

            def attend(
                layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
            ) -> torch.Tensor:
                cache.keys[layer][old : old + group, :, end - width : end] = k
                cache.values[layer][old : old + group, :, end - width : end] = v
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, scale=weights.scaling,
                    enable_gqa=True,
                )  # fmt: skip

        with torch.inference_mode():
            hidden = weights.forward(input_ids, positions, attend, prefill=True)
            logits = weights.logits(hidden[:, -1, :])
        cache.start = torch.cat([cache.start, starts])
        cache.reach += reach
        for row, tokens, start in zip(rows, token_lists, starts.tolist(), strict=True):
            if len(tokens) <= store.budget and not store.covers(tokens):
                keys = torch.stack([k[row, :, start:end] for k in cache.keys])
                values = torch.stack([v[row, :, start:end] for v in cache.values])
                store.add(tokens, keys, values)
        return logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token for every row; logits of the next."""
        logits = self.start_decode(tokens).run()
        assert logits is not None
        return logits

    def start_decode(self, tokens: list[int]) -> LayerStep:
        """A decode step (one token for every row) to run a few layers at a time; nothing else
        may change this decoder's rows until it is done."""
        cache, weights = self.cache, self.weights
        cache.make_room(cache.rows, 1)
        n, first, column = cache.rows, cache.first, cache.length
        positions = (column - cache.start)[:, None]
        seen = torch.arange(first, column + 1)[None, :] >= cache.start[:, None]
        unseen = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))[:, None, None]
        kv_heads, head_dim = weights.kv_heads, weights.head_dim
        group = weights.heads // kv_heads

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[layer], cache.values[layer]
            keys[:n, :, column : column + 1] = k
            values[:n, :, column : column + 1] = v
            # One query a row: the queries sharing a key/value head form one small product with
            # it, keys and values not repeated. SDPA's CPU kernel took twice as long for this
            # (270 against 135 us a layer at 16 rows over 150 columns).
            # A bfloat16 cache is read as it is, by bfloat16 products: converting it first would
            # read and write all of it again; the softmax stays in float32.
            queries = q.reshape(n, kv_heads, group, head_dim).to(keys.dtype)
            scores = torch.matmul(queries, keys[:n, :, first : column + 1].transpose(-1, -2))
            scores = scores.float().mul_(weights.scaling).add_(unseen)
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            out = torch.matmul(probs, values[:n, :, first : column + 1])
            return out.view(n, weights.heads, 1, head_dim)

        def finish(hidden: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                logits = weights.logits(hidden[:, -1, :])
            cache.length += 1
            return logits

        inputs = torch.tensor(tokens)[:, None]
        return LayerStep(LayerPass(weights, inputs, positions, attend, prefill=False), finish)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        self.cache.keep(rows)
