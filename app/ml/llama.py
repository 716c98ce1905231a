"""The decode path for Llama-family models: packed weights, a growing KV cache, fp32 attention.

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
runs on transformers' forward (`app/ml/decoders.py`). A test checks that both give the same
logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

if TYPE_CHECKING:
    from app.ml.lora import LoraWeights

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Given a layer's index and its new queries, keys and values (fp32), stores the keys and values
and returns attention over what each row sees."""

SUPPORTED = frozenset({"llama", "qwen2"})
"""Model types whose decoder layers this module computes exactly like transformers does."""


Projection = Callable[[torch.Tensor], torch.Tensor]
"""One or more linear layers applied to the same input, their outputs side by side."""


def _packed(*layers: torch.nn.Linear) -> Projection:
    """The layers as one product on a copy of their weights in oneDNN's blocked layout."""
    weights = [layer.weight.detach() for layer in layers]
    # The batch size is a hint for oneDNN's layout; any batch size works with it.
    weight = torch.ops.mkldnn._reorder_linear_weight(
        torch.cat(weights) if len(weights) > 1 else weights[0], 16
    )
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat(
            [
                layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(len(w))
                for layer, w in zip(layers, weights, strict=True)
            ]
        )

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    return project


GROUP = 32
"""Inputs sharing one 4-bit scale and minimum: the layout of a Q4_1 GGUF, like the default
model's."""


def _fastest(*layers: torch.nn.Linear) -> Projection:
    """4-bit where the weights already are 4-bit and bf16, else oneDNN-packed."""
    return _int4(*layers) or _packed(*layers)


def _int4(*layers: torch.nn.Linear) -> Projection | None:
    """The layers as one product on 4-bit weights, or None unless that loses nothing: every
    group of GROUP inputs holds at most 16 evenly spaced values (as after a Q4_1 GGUF), up to
    bf16's rounding. Only for bf16 weights, where torch's int4 kernel is fast (3.7 against
    11.6 ms for the default model's 30 layers at batch 1 here; at batch 16 22 against 16 ms)."""
    dtype = layers[0].weight.dtype
    if dtype != torch.bfloat16 or any(layer.bias is not None for layer in layers):
        return None
    weight = torch.cat([layer.weight.detach() for layer in layers]).float()
    rows, inputs = weight.shape
    if inputs % GROUP:
        return None
    blocks = weight.view(rows, inputs // GROUP, GROUP)
    low = blocks.amin(-1, keepdim=True)
    step = (blocks.amax(-1, keepdim=True) - low) / 15
    levels = ((blocks - low) / step.clamp(min=torch.finfo(torch.float32).tiny)).round()
    error = (levels * step + low - blocks).abs()
    # On a 4-bit grid, each weight sits on its level up to bf16's rounding; weights that are
    # not are typically a quarter of a step or more away from the nearest level.
    if bool((error > 0.05 * step + blocks.abs() * 2**-8).any()):
        return None
    try:
        return Int4Linear(levels.view(rows, inputs), step.squeeze(-1), low.squeeze(-1), dtype)
    except RuntimeError:  # a shape the int4 kernel does not take
        return None


class Int4Linear:
    """A product on 4-bit weights with a bf16 scale and zero per GROUP inputs and output."""

    def __init__(
        self, levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self.outputs, self.inputs = levels.shape
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 2)
        # The kernel computes (level - 8) * scale + zero, per group and output.
        scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1)
        self.scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.inputs), self.weight, GROUP, self.scales_and_zeros
        )
        return out.view(*x.shape[:-1], self.outputs)


def _adapted(
    project: Projection,
    dtype: torch.dtype,
    parts: list[tuple[torch.Tensor, torch.Tensor, float] | None],
    outputs: list[int],
) -> Projection:
    """`project` (on weights of `dtype`) plus LoRA updates of its layers, unmerged: float32 in
    and out, the update computed in float32. `parts` holds each layer's (A, B, scaling), or None
    for a layer without one; `outputs` each layer's output size."""
    if all(part is None for part in parts):
        return project if dtype == torch.float32 else lambda x: project(x.to(dtype)).float()
    # One product for all the layers: their A matrices stacked, their B matrices (scaled) on the
    # diagonal of one, so each layer's update reads only its own A's outputs.
    ranks = [part[0].shape[0] if part is not None else 0 for part in parts]
    down = torch.cat([part[0] for part in parts if part is not None]).T.contiguous()
    up = torch.zeros(sum(ranks), sum(outputs))
    row = column = 0
    for part, rank, size in zip(parts, ranks, outputs, strict=True):
        if part is not None:
            up[row : row + rank, column : column + size] = (part[1] * part[2]).T
        row, column = row + rank, column + size

    def project_adapted(x: torch.Tensor) -> torch.Tensor:
        out = project(x.to(dtype)).float()
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(x.reshape(-1, x.shape[-1]) @ down, up)
        return out

    return project_adapted


def _own(*layers: torch.nn.Linear) -> Projection:
    """The layers on their own weights (no copy)."""
    if len(layers) == 1:
        (layer,) = layers
        return lambda x: F.linear(x, layer.weight, layer.bias)
    return lambda x: torch.cat([F.linear(x, layer.weight, layer.bias) for layer in layers], -1)


@dataclass(frozen=True, eq=False)
class LlamaLayer:
    """One decoder layer's projections (q/k/v fused, gate/up fused) and norm weights."""

    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    input_norm: torch.Tensor
    """RMSNorm weight before attention."""
    post_norm: torch.Tensor
    """RMSNorm weight before the MLP."""


def _arranged(
    model: PreTrainedModel, project: Callable[..., Projection]
) -> tuple[list[LlamaLayer], Projection]:
    """The model's decoder layers and output layer through `project`."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            LlamaLayer(
                qkv=project(attn.q_proj, attn.k_proj, attn.v_proj),
                o=project(attn.o_proj),
                gate_up=project(mlp.gate_proj, mlp.up_proj),
                down=project(mlp.down_proj),
                input_norm=layer.input_layernorm.weight,
                post_norm=layer.post_attention_layernorm.weight,
            )
        )
    return layers, project(model.get_output_embeddings())


class LlamaWeights:
    """A model's layers arranged for decoding, and the forward pass that runs on them.

    Packed (`pack=True`), a decode step runs on the fewest bytes that lose nothing: 4-bit
    weights where they already are 4-bit (`Int4Linear`), else copies in oneDNN's layout (about
    half the time of `F.linear`, for one more copy in memory and 0.2-0.3 s of packing). Prefill
    is compute-bound, so it runs on the model's own weights: as fast as packed ones there, and
    twice as fast as 4-bit ones. Unpacked, everything runs on the model's own weights.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        layers: list[LlamaLayer],
        head: Projection,
        prefill_layers: list[LlamaLayer] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = model.config
        self.model = model
        self.dtype = dtype or model.dtype
        """The residual stream's dtype: the model's, or float32 with a LoRA update unmerged."""
        self.layers = layers
        """What a decode step runs on."""
        self.prefill_layers = prefill_layers or layers
        """What a prefill runs on."""
        self.head = head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.scaling = self.head_dim**-0.5
        self.act = F.silu if config.hidden_act == "silu" else ACT2FN[config.hidden_act]
        self.intermediate = int(config.intermediate_size)
        self.eps = float(config.rms_norm_eps)
        self.context_length = int(getattr(config, "max_position_embeddings", None) or 2048)
        kv_bytes = len(layers) * 2 * self.kv_heads * self.head_dim * 4
        self.prefixes = PrefixStore(PREFIX_CACHE_BYTES // kv_bytes)
        """Keys and values of recent prompts on these weights, for prompts that start alike."""

    @property
    def four_bit(self) -> int:
        """How many of a decode step's projections run on 4-bit weights."""
        projections = [
            p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
        ]
        return sum(isinstance(p, Int4Linear) for p in [*projections, self.head])

    @classmethod
    def of(cls, model: PreTrainedModel, pack: bool = True) -> LlamaWeights | None:
        """The model arranged for decoding, or None where this module cannot run it exactly.
        Packing falls back to the model's own weights where oneDNN cannot pack them (bf16 on
        a CPU without AVX512 or AVX-NE-CONVERT)."""
        config = model.config
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        output = model.get_output_embeddings()
        if (
            config.model_type not in SUPPORTED
            or any(kind != "full_attention" for kind in layer_types)
            or not isinstance(output, torch.nn.Linear)
            or output.bias is not None
        ):
            return None
        own, own_head = _arranged(model, _own)
        if pack and torch.backends.mkldnn.is_available():
            try:
                return cls(model, *_arranged(model, _fastest), prefill_layers=own)
            except RuntimeError:
                pass
        return cls(model, own, own_head)

    def adapted(self, lora: LoraWeights) -> LlamaWeights | None:
        """These weights plus a LoRA update, unmerged, in float32 (activations too), or None
        where the update adapts a layer this path does not compute.

        The base's products run on the same weights, kernels and dtype as the base's own
        decode steps; the update (`x @ A.T @ B.T * scaling`, a rank-r product per layer) and
        the residual stream are float32, so all of a round's update is kept. Building this
        copies no weights.
        """
        modules = dict(self.model.named_modules())
        used: set[str] = set()

        def adapt(project: Projection, *paths: str) -> Projection:
            used.update(path for path in paths if path in lora)
            outputs = [modules[path].weight.shape[0] for path in paths]
            return _adapted(project, self.model.dtype, [lora.get(p) for p in paths], outputs)

        def adapt_layers(layers: list[LlamaLayer]) -> list[LlamaLayer]:
            adapted = []
            for index, layer in enumerate(layers):
                attn, mlp = f"model.layers.{index}.self_attn.", f"model.layers.{index}.mlp."
                adapted.append(
                    LlamaLayer(
                        qkv=adapt(layer.qkv, attn + "q_proj", attn + "k_proj", attn + "v_proj"),
                        o=adapt(layer.o, attn + "o_proj"),
                        gate_up=adapt(layer.gate_up, mlp + "gate_proj", mlp + "up_proj"),
                        down=adapt(layer.down, mlp + "down_proj"),
                        input_norm=layer.input_norm,
                        post_norm=layer.post_norm,
                    )
                )
            return adapted

        head_path = next(n for n, m in modules.items() if m is self.model.get_output_embeddings())
        layers = adapt_layers(self.layers)
        prefill = None if self.prefill_layers is self.layers else adapt_layers(self.prefill_layers)
        head = adapt(self.head, head_path)
        if used != lora.keys():
            return None
        return LlamaWeights(self.model, layers, head, prefill, dtype=torch.float32)

    def norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as transformers computes it: normalised in fp32, scaled in the model's dtype."""
        normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.eps)
        return weight * normed.to(hidden.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states (before the final norm)."""
        return self.head(self.norm(hidden, self.model.model.norm.weight))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend, prefill: bool
    ) -> torch.Tensor:
        """Hidden states after the last layer for `input_ids` [rows, tokens] at `positions`;
        `attend(layer, q, k, v)` stores keys and values and computes attention (fp32)."""
        hidden = LayerPass(self, input_ids, positions, attend, prefill).run()
        assert hidden is not None
        return hidden


class LayerPass:
    """A forward pass that can be run a few layers at a time (`run`), so that other work can
    go between its parts; the hidden states wait in between."""

    def __init__(
        self,
        weights: LlamaWeights,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
        prefill: bool,
    ) -> None:
        self.weights, self.attend = weights, attend
        self.layers = weights.prefill_layers if prefill else weights.layers
        self.done = 0
        """Layers computed so far."""
        inner = weights.model.model
        with torch.inference_mode():
            self.hidden = inner.embed_tokens(input_ids).to(weights.dtype)
            # Rotary embedding in fp32 on queries and keys at once: x * cos + rotate_half(x) *
            # sin, with rotate_half(x) = roll(x) with its first half negated, folded into sin.
            cos, sin = inner.rotary_emb(torch.empty(0), positions)
            cos, sin = cos[:, None], sin[:, None]
            half = weights.head_dim // 2
            self.cos, self.sin = cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    @property
    def left(self) -> int:
        """Layers still to compute."""
        return len(self.layers) - self.done

    def run(self, layers: int | None = None) -> torch.Tensor | None:
        """Compute the next `layers` layers (all that are left by default); the hidden states
        after the last layer once it is done, None before."""
        w = self.weights
        rows, tokens, _ = self.hidden.shape
        heads, kv_heads, head_dim, half = w.heads, w.kv_heads, w.head_dim, w.head_dim // 2
        inter, hidden, cos, sin = w.intermediate, self.hidden, self.cos, self.sin
        end = len(self.layers) if layers is None else min(len(self.layers), self.done + layers)
        with torch.inference_mode():
            for index in range(self.done, end):
                layer = self.layers[index]
                qkv = layer.qkv(w.norm(hidden, layer.input_norm)).float()
                qkv = qkv.view(rows, tokens, heads + 2 * kv_heads, head_dim).transpose(1, 2)
                qk = qkv[:, : heads + kv_heads]
                qk = qk * cos + qk.roll(half, dims=-1) * sin
                out = self.attend(index, qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :])
                out = out.to(hidden.dtype).transpose(1, 2).reshape(rows, tokens, heads * head_dim)
                hidden = hidden + layer.o(out)
                gate_up = layer.gate_up(w.norm(hidden, layer.post_norm))
                gated = w.act(gate_up[..., :inter]) * gate_up[..., inter:]
                hidden = hidden + layer.down(gated)
        self.hidden, self.done = hidden, end
        return hidden if self.done == len(self.layers) else None


PREFIX_CACHE_BYTES = 128 * 2**20
"""Memory per version for the keys and values of recent prompts (about 2,800 tokens of the
default model's)."""
MIN_REUSE = 8
"""Fewest prompt tokens worth taking from the prefix store instead of computing."""


@dataclass(eq=False)
class Prefix:
    """A prompt's keys and values, [layers, kv heads, tokens, head dim] each."""

    tokens: list[int]
    keys: torch.Tensor
    values: torch.Tensor


SMALL_CHUNK = 32
"""Chunks of a long prompt up to this many tokens run on the decode weights."""


@dataclass(eq=False)
class Partial:
    """A long prompt being prefilled a chunk at a time: the keys and values of its first
    `done` tokens, [layers, kv heads, tokens, head dim] each (room for all but its last)."""

    prompt: torch.Tensor
    reach: int
    keys: torch.Tensor
    values: torch.Tensor
    done: int = 0

    @property
    def left(self) -> int:
        """Tokens still to compute."""
        return len(self.prompt) - self.done

    @property
    def nbytes(self) -> int:
        """Bytes its keys and values take."""
        return self.keys.nbytes + self.values.nbytes


def _shared(a: list[int], b: list[int]) -> int:
    """How many tokens two sequences share from their start."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


class PrefixStore:
    """The keys and values of recent prompts, so that a prompt starting like one of them (the
    chat template's system prompt, an earlier turn of the conversation, the same prompt again)
    computes only the rest. Least recently used first out, within a budget of tokens.

    A key or value depends only on the tokens up to it, so a stored one is what prefilling would
    compute again, up to the order of floating-point sums.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        """Most tokens held."""
        self._entries: list[Prefix] = []  # least recently used first
        self.tokens = 0

    def longest(self, prompt: list[int]) -> tuple[Prefix | None, int]:
        """The stored prompt sharing the longest start with `prompt`, and how many tokens they
        share (fewer than the whole prompt: its last token is always computed)."""
        best, shared = None, 0
        for entry in self._entries:
            n = _shared(entry.tokens, prompt[:-1])
            if n > shared:
                best, shared = entry, n
        if best is None or shared < MIN_REUSE:
            return None, 0
        self._entries.remove(best)
        self._entries.append(best)
        return best, shared

    def add(self, prompt: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep a prompt's keys and values, dropping stored prompts it starts with."""
        if len(prompt) > self.budget:
            return
        for entry in list(self._entries):
            if entry.tokens == prompt[: len(entry.tokens)]:
                self._entries.remove(entry)
                self.tokens -= len(entry.tokens)
        self._entries.append(Prefix(prompt, keys, values))
        self.tokens += len(prompt)
        while self.tokens > self.budget:
            self.tokens -= len(self._entries.pop(0).tokens)

    def covers(self, prompt: list[int]) -> bool:
        """Whether a stored prompt starts with all of `prompt`."""
        return any(e.tokens[: len(prompt)] == prompt for e in self._entries)


ROW_SLACK = 4
"""A KV cache that grows to hold n rows makes room for n // ROW_SLACK more (few copies as
requests join, at most a quarter more memory than its rows need)."""
ROOM = 64
"""Columns a cache keeps beyond the most its rows can reach, so that moving its used columns to
the front happens once every ROOM steps at most."""


def _rows_for(rows: int) -> int:
    return rows + rows // ROW_SLACK


class KVCache:
    """Keys and values of a batch's rows, per layer, in fp32 buffers.

    Buffers are [row capacity, kv heads, column capacity, head dim]. Row r holds its tokens in
    columns `start[r]` to `length - 1`; the columns before are masked. Every row's latest token
    is in column `length - 1`, so a decode step writes each row's next token in column
    `length`. Buffers start zeroed, so masked columns never hold NaN (0 x NaN would leak into
    attention).

    Each row says how many columns it can ever use (`reach`: its prompt plus its most new
    tokens). Columns grow by doubling up to the largest reach plus ROOM, rows by ROW_SLACK, so
    `footprint` bounds the memory a batch can take before a request joins it; buffers shrink
    again when the rows that needed them leave.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, limit: int) -> None:
        self.shape = (layers, kv_heads, head_dim)
        self.limit = limit
        """Columns never grow past this (the model's context: no row needs more)."""
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.start = torch.zeros(0, dtype=torch.long)
        self.reach: list[int] = []
        """Per row, the most columns it can ever use."""
        self.length = 0

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return int(self.start.shape[0])

    @property
    def first(self) -> int:
        """The first column any row uses; attention reads from here."""
        return int(self.start.min()) if self.rows else self.length

    @property
    def bytes_per_column(self) -> int:
        """Bytes one row's keys and values take per token, all layers together."""
        layers, kv_heads, head_dim = self.shape
        return 2 * layers * kv_heads * head_dim * 4

    def _capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def _column_cap(self, reach: list[int]) -> int:
        return min(self.limit, max(reach, default=0) + ROOM)

    def footprint(self, reach: list[int] | None = None) -> int:
        """The most bytes this cache can take with its rows, plus new rows of these reaches."""
        all_reach = [*self.reach, *(reach or [])]
        row_cap, col_cap = self._capacity()
        rows = max(row_cap, _rows_for(len(all_reach)))
        columns = max(col_cap, self._column_cap(all_reach)) if all_reach else col_cap
        return rows * columns * self.bytes_per_column

    def _grown(self, rows: int, columns: int, reach: list[int]) -> tuple[int, int] | None:
        """The buffers' size for `rows` rows and `columns` more columns (`reach`: the new rows'
        reaches), or None where they already have room."""
        row_cap, col_cap = self._capacity()
        used = self.length - self.first
        if rows <= row_cap and self.length + columns <= col_cap:
            return None
        cap = self._column_cap([*self.reach, *reach])
        doubled = max(2 * col_cap if used + columns > col_cap else col_cap, 64)
        return max(row_cap, _rows_for(rows)), max(used + columns, min(doubled, max(cap, col_cap)))

    def make_room(self, rows: int, columns: int, reach: list[int] | None = None) -> None:
        """Capacity for `rows` rows and `columns` more columns (`reach`: the new rows' reaches
        when rows are added); growing or compacting moves the used columns to the front (so
        `start` and `length` change)."""
        size = self._grown(rows, columns, reach or [])
        if size is not None:
            self._resize(*size)

    def _resize(self, new_rows: int, new_cols: int) -> None:
        """Buffers of this size holding the used columns at the front, one layer at a time (so
        a resize never holds two copies of the whole cache)."""
        Room(self, new_rows, new_cols, 0).make()

    def room(self, rows: int, span: int, reach: list[int]) -> Room:
        """Room for new rows (of these reaches) up to `rows` in all whose tokens span `span`
        columns ending where the batch's rows end: the buffers grow, or the rows' tokens move
        right, once `Room.make` (or each layer's `Room.layer`) has run."""
        used = self.length - self.first
        size = self._grown(rows, max(0, span - used), reach)
        if size is None:
            return Room(self, *self._capacity(), self.first + max(0, span - self.length))
        return Room(self, *size, max(0, span - used))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order; buffers shrink when the rest need much less."""
        if not rows:
            self.keys, self.values, self.reach = [], [], []
            self.start, self.length = torch.zeros(0, dtype=torch.long), 0
            return
        if rows != list(range(len(rows))):
            first, index = self.first, torch.tensor(rows)
            for buffer in (*self.keys, *self.values):
                buffer[: len(rows), :, first : self.length] = buffer[index, :, first : self.length]
        self.start = self.start[rows]
        self.reach = [self.reach[i] for i in rows]
        row_cap, col_cap = self._capacity()
        need_rows, need_cols = _rows_for(len(rows)), self._column_cap(self.reach)
        if row_cap > 2 * need_rows or col_cap > 2 * need_cols:
            self._resize(need_rows, max(need_cols, self.length - self.first))


class Room:
    """A cache's buffers at a new size, with its rows' used columns moved to start at column
    `to`, made a layer at a time (`layer`, so that the copies can go between other work) or
    whole (`make`). Until every layer is made, nothing else may read or change the cache."""

    def __init__(self, cache: KVCache, rows: int, columns: int, to: int) -> None:
        self.cache, self.size, self.to = cache, (rows, columns), to
        self._from = (cache.first, cache.length)
        self._made: set[int] = set()
        self.length = to + cache.length - cache.first
        """The cache's `length` once made: where its rows' tokens end."""

    def layer(self, index: int) -> None:
        """Make one layer's buffers (keys and values); once every layer is made, the cache's
        `start` and `length` say where its rows are."""
        cache, (first, length) = self.cache, self._from
        if index in self._made:
            return
        n, used = cache.rows, length - first
        layers, kv_heads, head_dim = cache.shape
        if not cache.keys:
            cache.keys, cache.values = [torch.empty(0)] * layers, [torch.empty(0)] * layers
        for buffers in (cache.keys, cache.values):
            buffer = buffers[index]
            if tuple(buffer.shape[::2]) != self.size:
                # Made during a forward pass too: a normal tensor, which later steps may change.
                with torch.inference_mode(False):
                    grown = torch.zeros(self.size[0], kv_heads, self.size[1], head_dim)
                if n:
                    grown[:n, :, self.to : self.to + used] = buffer[:n, :, first:length]
                buffers[index] = grown
            elif self.to != first:
                buffer[:n, :, self.to : self.to + used] = buffer[:n, :, first:length].clone()
        self._made.add(index)
        if len(self._made) == layers:
            cache.start = cache.start - first + self.to
            cache.length = self.length

    def make(self) -> None:
        """Make every layer not made yet."""
        for index in range(self.cache.shape[0]):
            self.layer(index)


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
            len(weights.layers), weights.kv_heads, weights.head_dim, weights.context_length
        )
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
        partial = Partial(prompt, reach or self.cache.limit, torch.empty(shape), torch.empty(shape))
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
                q, partial.keys[layer, None, :, :end], partial.values[layer, None, :, :end],
                attn_mask=mask, scale=weights.scaling, enable_gqa=True,
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
                q, keys[row : row + 1, :, start : room.length],
                values[row : row + 1, :, start : room.length], attn_mask=mask,
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
                common = common[: _shared(common, tokens)]
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
                    q, keys[old : old + group, :, end - span : end],
                    values[old : old + group, :, end - span : end], attn_mask=mask,
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
            queries = q.reshape(n, kv_heads, group, head_dim)
            scores = torch.matmul(queries, keys[:n, :, first : column + 1].transpose(-1, -2))
            scores = scores.mul_(weights.scaling).add_(unseen)
            out = torch.matmul(torch.softmax(scores, dim=-1), values[:n, :, first : column + 1])
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
