"""What a batch decodes with: the Llama-family path (`app/ml/llama.py`), transformers' otherwise.

A decoder holds the KV cache of one batch's rows. `prefill` adds rows, `decode` advances every
row by one token, `keep` drops finished rows; each returns or takes rows in batch order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from app.ml.llama import LlamaDecoder

if TYPE_CHECKING:
    from app.ml.registry import ServingVersion


class Decoder(Protocol):
    """The KV cache of a batch's rows and the forward passes over it."""

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        ...

    def prefill(self, prompts: list[torch.Tensor], reuse: bool = True) -> torch.Tensor:
        """Add one row per prompt (1-D token ids); logits of their last tokens. Without `reuse`,
        every prompt is computed whole, from no stored keys."""
        ...

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token for every row; logits of the next."""
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

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return int(self.mask.shape[0])

    def prefill(self, prompts: list[torch.Tensor], reuse: bool = True) -> torch.Tensor:
        """Add one row per prompt, prefilled one at a time and whole (nothing is stored to
        reuse); logits of their last tokens."""
        before = self.cache, self.mask
        try:
            return torch.cat([self._prefill_one(prompt) for prompt in prompts])
        except BaseException:
            self.cache, self.mask = before  # merging builds new tensors: these are intact
            raise

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

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order; trims columns no row uses any more."""
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
