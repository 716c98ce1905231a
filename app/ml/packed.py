"""The decode path for Llama-family models: packed weights, a growing KV cache, fp32 attention.

transformers' own forward is written for every model and every device; on a 2-core CPU three
of its choices cost most of a decode step (default model, bf16, measured on an AVX512-BF16
EPYC here):
- `F.linear` on bf16 weights goes through oneDNN, which reorders the weight on every call.
  Weights reordered once into oneDNN's blocked layout (`_reorder_linear_weight`) take about half
  the time (33 against 63 us for a 1536 x 576 layer at batch 1). Fusing q/k/v and gate/up into
  one product each also halves the number of calls.
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

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Given a layer's index and its new queries, keys and values (fp32), stores the keys and values
and returns attention over what each row sees."""

SUPPORTED = frozenset({"llama", "qwen2"})
"""Model types whose decoder layers this module computes exactly like transformers does."""


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # The batch size is a hint for oneDNN's layout; any batch size works with it.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _cat_bias(*layers: torch.nn.Linear) -> torch.Tensor | None:
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat(
        [
            layer.bias.detach()
            if layer.bias is not None
            else layer.weight.new_zeros(layer.out_features)
            for layer in layers
        ]
    )


@dataclass(frozen=True, eq=False)
class PackedLayer:
    """One decoder layer's weights in oneDNN's layout: q/k/v fused, gate/up fused."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    input_norm: torch.Tensor
    """RMSNorm weight before attention."""
    post_norm: torch.Tensor
    """RMSNorm weight before the MLP."""


class PackedModel:
    """A model's weights packed for decoding, and the forward pass that runs on them.

    The packed weights are copies: they are taken once, from the weights as they are when the
    serving version is built, and cost one more copy of the linear layers' weights in memory.
    """

    def __init__(self, model: PreTrainedModel, layers: list[PackedLayer], head: torch.Tensor):
        config = model.config
        self.model = model
        self.layers = layers
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

    @classmethod
    def of(cls, model: PreTrainedModel) -> PackedModel | None:
        """The model packed, or None where this module cannot run it exactly."""
        config = model.config
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        output = model.get_output_embeddings()
        if (
            config.model_type not in SUPPORTED
            or any(kind != "full_attention" for kind in layer_types)
            or not torch.backends.mkldnn.is_available()
            or not isinstance(output, torch.nn.Linear)
            or output.bias is not None
        ):
            return None
        try:
            layers = []
            for layer in model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                layers.append(
                    PackedLayer(
                        qkv=_pack(
                            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
                        ),
                        qkv_bias=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj),
                        o=_pack(attn.o_proj.weight),
                        o_bias=_cat_bias(attn.o_proj),
                        gate_up=_pack(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                        gate_up_bias=_cat_bias(mlp.gate_proj, mlp.up_proj),
                        down=_pack(mlp.down_proj.weight),
                        down_bias=_cat_bias(mlp.down_proj),
                        input_norm=layer.input_layernorm.weight,
                        post_norm=layer.post_attention_layernorm.weight,
                    )
                )
            head = _pack(output.weight)
        except RuntimeError:  # e.g. bf16 on a CPU without AVX512 or AVX-NE-CONVERT
            return None
        return cls(model, layers, head)

    def norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as transformers computes it: normalised in fp32, scaled in the model's dtype."""
        normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.eps)
        return weight * normed.to(hidden.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states (before the final norm)."""
        return _linear(self.norm(hidden, self.model.model.norm.weight), self.head, None)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
    ) -> torch.Tensor:
        """Hidden states after the last layer for `input_ids` [rows, tokens] at `positions`;
        `attend(layer, q, k, v)` stores keys and values and computes attention (fp32)."""
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        rows, tokens = input_ids.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        # Rotary embedding in fp32 on queries and keys at once: x * cos + rotate_half(x) * sin,
        # with rotate_half(x) = roll(x) with its first half negated, folded into sin.
        cos, sin = inner.rotary_emb(torch.empty(0), positions)
        cos, sin = cos[:, None], sin[:, None]
        half = head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        inter = self.intermediate
        for index, layer in enumerate(self.layers):
            qkv = _linear(self.norm(hidden, layer.input_norm), layer.qkv, layer.qkv_bias).float()
            qkv = qkv.view(rows, tokens, heads + 2 * kv_heads, head_dim).transpose(1, 2)
            qk = qkv[:, : heads + kv_heads]
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            out = attend(index, qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :])
            out = out.to(hidden.dtype).transpose(1, 2).reshape(rows, tokens, heads * head_dim)
            hidden = hidden + _linear(out, layer.o, layer.o_bias)
            gate_up = _linear(self.norm(hidden, layer.post_norm), layer.gate_up, layer.gate_up_bias)
            gated = self.act(gate_up[..., :inter]) * gate_up[..., inter:]
            hidden = hidden + _linear(gated, layer.down, layer.down_bias)
        return hidden


class KVCache:
    """Keys and values of a batch's rows, per layer, in fp32 buffers that grow by doubling.

    Buffers are [row capacity, kv heads, column capacity, head dim]. Row r holds its tokens in
    columns `start[r]` to `length - 1`; the columns before are masked. Every row's latest token
    is in column `length - 1`, so a decode step writes each row's next token in column
    `length`. Buffers start zeroed, so masked columns never hold NaN (0 x NaN would leak into
    attention).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int) -> None:
        self.shape = (layers, kv_heads, head_dim)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.start = torch.zeros(0, dtype=torch.long)
        self.length = 0

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return int(self.start.shape[0])

    @property
    def first(self) -> int:
        """The first column any row uses; attention reads from here."""
        return int(self.start.min()) if self.rows else self.length

    def make_room(self, rows: int, columns: int) -> None:
        """Capacity for `rows` rows and `columns` more columns; growing moves the used columns
        to the front (so `start` and `length` change)."""
        layers, kv_heads, head_dim = self.shape
        row_cap, col_cap = (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)
        first = self.first
        used = self.length - first
        if rows <= row_cap and self.length + columns <= col_cap:
            return
        new_rows = max(rows, 2 * row_cap if rows > row_cap else row_cap, 4)
        new_cols = max(used + columns, 2 * col_cap if used + columns > col_cap else col_cap, 64)
        n = self.rows
        for buffers in (self.keys, self.values):
            old = buffers[:]
            buffers[:] = [
                torch.zeros(new_rows, kv_heads, new_cols, head_dim) for _ in range(layers)
            ]
            for grown, buffer in zip(buffers, old, strict=False):
                grown[:n, :, :used] = buffer[:n, :, first : self.length]
        self.start = self.start - first
        self.length = used

    def shift(self, columns: int) -> None:
        """Move every row's tokens `columns` to the right (room must have been made)."""
        if columns <= 0:
            return
        first, n = self.first, self.rows
        for buffer in (*self.keys, *self.values):
            buffer[:n, :, first + columns : self.length + columns] = buffer[
                :n, :, first : self.length
            ].clone()
        self.start = self.start + columns
        self.length += columns

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        if not rows:
            self.keys, self.values = [], []
            self.start, self.length = torch.zeros(0, dtype=torch.long), 0
            return
        if rows != list(range(len(rows))):
            first, index = self.first, torch.tensor(rows)
            for buffer in (*self.keys, *self.values):
                buffer[: len(rows), :, first : self.length] = buffer[index, :, first : self.length]
        self.start = self.start[rows]


class PackedDecoder:
    """The rows of one batch on a packed model: prefill adds rows, decode steps all of them."""

    def __init__(self, packed: PackedModel) -> None:
        self.packed = packed
        self.cache = KVCache(len(packed.layers), packed.kv_heads, packed.head_dim)

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return self.cache.rows

    def prefill(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        """Add one row per prompt (1-D token ids), prefilled together; logits of their last
        tokens."""
        cache, packed = self.cache, self.packed
        lengths = torch.tensor([len(p) for p in prompts])
        width, group, old = int(lengths.max()), len(prompts), cache.rows
        pad = width - lengths
        input_ids = torch.zeros(group, width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, int(pad[i]) :] = prompt
        grow = max(0, width - cache.length)
        cache.make_room(old + group, grow)
        cache.shift(grow)
        end = cache.length  # the prompts end where the batch's rows do
        columns = torch.arange(width)
        positions = (columns[None, :] - pad[:, None]).clamp(min=0)
        mask: torch.Tensor | None = None
        if bool(pad.any()):
            # Left padding: a real query sees real keys up to itself. A padding query sees only
            # itself, so its softmax is over a real number (a row of -inf gives NaN).
            causal = columns[None, :] <= columns[:, None]
            real = columns[None, :] >= pad[:, None]
            mask = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
            mask = mask[:, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.keys[layer][old : old + group, :, end - width : end] = k
            cache.values[layer][old : old + group, :, end - width : end] = v
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=packed.scaling,
                enable_gqa=True,
            )  # fmt: skip

        with torch.inference_mode():
            hidden = packed.forward(input_ids, positions, attend)
            logits = packed.logits(hidden[:, -1, :])
        cache.start = torch.cat([cache.start, end - lengths])
        return logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token for every row; logits of the next."""
        cache, packed = self.cache, self.packed
        cache.make_room(cache.rows, 1)
        n, first, column = cache.rows, cache.first, cache.length
        positions = (column - cache.start)[:, None]
        seen = torch.arange(first, column + 1)[None, :] >= cache.start[:, None]
        mask = seen[:, None, None, :]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[layer], cache.values[layer]
            keys[:n, :, column : column + 1] = k
            values[:n, :, column : column + 1] = v
            return F.scaled_dot_product_attention(
                q, keys[:n, :, first : column + 1], values[:n, :, first : column + 1],
                attn_mask=mask, scale=packed.scaling, enable_gqa=True,
            )  # fmt: skip

        with torch.inference_mode():
            hidden = packed.forward(torch.tensor(tokens)[:, None], positions, attend)
            logits = packed.logits(hidden[:, -1, :])
        cache.length += 1
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        self.cache.keep(rows)
