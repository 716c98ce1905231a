"""What a batch decodes with: the Llama path (`app/engine/llama/`), transformers' otherwise.

A decoder holds the KV cache of one batch's rows. `prefill` adds rows, `decode` advances every
row by one token, `keep` drops finished rows; each returns or takes rows in batch order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from app.engine.llama.decoder import LlamaDecoder
from app.engine.llama.prefixes import Partial

if TYPE_CHECKING:
    from app.engine.registry import ServingVersion


class Step(Protocol):
    """A decode step that can run a few layers at a time, so other work can go between."""

    @property
    def layers(self) -> int:
        """Parts the step runs in (a model's layers, or 1 where it runs whole)."""
        ...

    @property
    def left(self) -> int:
        """Parts still to run."""
        ...

    def run(self, layers: int | None = None) -> torch.Tensor | None:
        """Run the next `layers` parts (all that are left by default); every row's logits once
        the step is done, None before."""
        ...


class Decoder(Protocol):
    """The KV cache of a batch's rows and the forward passes over it."""

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        ...

    def prefill(
        self, prompts: list[torch.Tensor], reuse: bool = True, reach: list[int] | None = None
    ) -> torch.Tensor:
        """Add one row per prompt (1-D token ids); logits of their last tokens. Without `reuse`,
        every prompt is computed whole, from no stored keys. `reach`: per prompt, the most
        tokens its row will hold (prompt and answer)."""
        ...

    def footprint(self, reach: list[int] | None = None, chunked: list[int] | None = None) -> int:
        """The most bytes the KV cache can take with its rows, plus new rows of these reaches
        and the buffers of new prompts of these lengths to prefill in chunks."""
        ...

    @property
    def allocated(self) -> int:
        """Bytes the KV cache holds now."""
        ...

    def begin(self, prompt: torch.Tensor, reuse: bool = True, reach: int | None = None) -> Partial:
        """Start prefilling a long prompt a chunk at a time (`advance`)."""
        ...

    def advance(self, partial: Partial, tokens: int) -> torch.Tensor | None:
        """Compute up to `tokens` more of a partial prompt; once it is whole it joins the batch
        as a row and the logits of its last token are returned (None before)."""
        ...

    def start_chunk(self, partial: Partial, tokens: int) -> Step:
        """The next `tokens` of a partial prompt (more are left after them) as a step to run in
        parts; it gives logits only where it made the prompt whole (it joined as a row)."""
        ...

    def drop(self, partial: Partial) -> None:
        """Stop prefilling a partial prompt."""
        ...

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token for every row; logits of the next."""
        ...

    def start_decode(self, tokens: list[int]) -> Step:
        """A decode step to run in parts; nothing else may change the rows until it is done."""
        ...

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        ...


def decoder_for(version: ServingVersion) -> Decoder:
    """A new, empty decoder for a batch on this version."""
    if version.llama is not None:
        return LlamaDecoder(version.llama)
    return TransformersDecoder(version.model)


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


class _Whole:
    """A step in one part."""

    layers = 1

    def __init__(self, compute: Callable[[], torch.Tensor | None]) -> None:
        self._compute: Callable[[], torch.Tensor | None] | None = compute

    @property
    def left(self) -> int:
        return 0 if self._compute is None else 1

    def run(self, layers: int | None = None) -> torch.Tensor | None:
        assert self._compute is not None, "the step is done"
        compute, self._compute = self._compute, None
        return compute()


class TransformersDecoder:
    """Any causal LM, through its own forward and a `DynamicCache`.

    Each prompt is prefilled alone; its cache is then left-padded to the batch's length (or the
    batch's to its) and concatenated along the batch dimension.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        """1 where a cache column holds a real token of that row, 0 for left padding."""
        self.reach: list[int] = []
        """Per row, the most tokens it can hold."""
        self.partials: list[Partial] = []
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", None) or 2048)
        layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 1))
        heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 1))
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * model.dtype.itemsize
        """Bytes of keys and values per token, all layers together."""

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return int(self.mask.shape[0])

    def prefill(
        self, prompts: list[torch.Tensor], reuse: bool = True, reach: list[int] | None = None
    ) -> torch.Tensor:
        """Add one row per prompt, prefilled one at a time and whole (nothing is stored to
        reuse); logits of their last tokens."""
        before = self.cache, self.mask, list(self.reach)
        try:
            logits = torch.cat([self._prefill_one(prompt) for prompt in prompts])
        except BaseException:
            self.cache, self.mask, self.reach = before  # merging builds new tensors: intact
            raise
        self.reach += reach or [self.context_length] * len(prompts)
        return logits

    def footprint(self, reach: list[int] | None = None, chunked: list[int] | None = None) -> int:
        """The most bytes the KV cache can take with its rows, plus new rows of these reaches:
        every row padded to the longest reach, twice over while a join concatenates (prompts
        are prefilled whole here: no chunk buffers)."""
        all_reach = [*self.reach, *(p.reach for p in self.partials), *(reach or [])]
        return 2 * len(all_reach) * max(all_reach, default=0) * self.bytes_per_token

    def begin(self, prompt: torch.Tensor, reuse: bool = True, reach: int | None = None) -> Partial:
        """A long prompt to prefill; here it is computed whole when it is advanced."""
        empty = torch.zeros(0)
        partial = Partial(prompt, reach or self.context_length, empty, empty)
        self.partials.append(partial)
        return partial

    def advance(self, partial: Partial, tokens: int) -> torch.Tensor | None:
        """Prefill the whole prompt (transformers' forward takes no chunks): its last logits."""
        self.partials.remove(partial)
        return self.prefill([partial.prompt], reach=[partial.reach])

    def start_chunk(self, partial: Partial, tokens: int) -> Step:
        """The whole prompt in one part: it joins as a row (see `advance`)."""
        return _Whole(lambda: self.advance(partial, tokens))

    def drop(self, partial: Partial) -> None:
        """Forget a partial prompt."""
        if partial in self.partials:
            self.partials.remove(partial)

    @property
    def allocated(self) -> int:
        """Bytes the KV cache holds now."""
        if self.cache is None:
            return 0
        return sum(k.nbytes + v.nbytes for k, v in _layers(self.cache))

    def _prefill_one(self, prompt: torch.Tensor) -> torch.Tensor:
        cache = DynamicCache(config=self.model.config)
        logits, cache = self._forward(input_ids=prompt[None, :], cache=cache)
        prompt_mask = torch.ones(1, len(prompt), dtype=torch.long)
        if self.cache is None:
            self.cache, self.mask = cache, prompt_mask
            return logits
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
        return logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token for every row; logits of the next."""
        assert self.cache is not None
        inputs = torch.tensor(tokens)[:, None]
        mask = torch.cat([self.mask, torch.ones_like(inputs)], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True)
        logits, self.cache = self._forward(
            input_ids=inputs, attention_mask=mask, position_ids=positions, cache=self.cache
        )
        self.mask = mask
        return logits

    def start_decode(self, tokens: list[int]) -> Step:
        """A decode step that runs whole: transformers' forward cannot stop between layers."""
        return _Whole(lambda: self.decode(tokens))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order; trims columns no row uses any more."""
        self.reach = [self.reach[i] for i in rows]
        if not rows:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return
        assert self.cache is not None
        index = torch.tensor(rows)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        # Columns that are padding for every remaining row only cost attention time.
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0])
        if start > 0:
            self.mask = self.mask[:, start:]
            trimmed = [(k[:, :, start:, :], v[:, :, start:, :]) for k, v in _layers(self.cache)]
            self.cache = DynamicCache(ddp_cache_data=trimmed)

    def _forward(self, **inputs: object) -> tuple[torch.Tensor, DynamicCache]:
        """Logits at each row's last position, and the updated cache."""
        with torch.inference_mode():
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.cache
