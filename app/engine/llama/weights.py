"""Llama-family layers arranged for decoding (packed, 4-bit, LoRA unmerged); the forward pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from app.engine.llama.prefixes import PREFIX_CACHE_BYTES, PrefixStore

if TYPE_CHECKING:
    from app.engine.lora import LoraWeights

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
        kv_dtype: torch.dtype = torch.float32,
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
        self.kv_dtype = kv_dtype
        """What KV caches of these weights hold keys and values in (`KVCache`)."""
        kv_bytes = len(layers) * 2 * self.kv_heads * self.head_dim * kv_dtype.itemsize
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
    def of(
        cls, model: PreTrainedModel, pack: bool = True, kv_dtype: torch.dtype = torch.float32
    ) -> LlamaWeights | None:
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
                return cls(
                    model, *_arranged(model, _fastest), prefill_layers=own, kv_dtype=kv_dtype
                )
            except RuntimeError:
                pass
        return cls(model, own, own_head, kv_dtype=kv_dtype)

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
        return LlamaWeights(
            self.model, layers, head, prefill, dtype=torch.float32, kv_dtype=self.kv_dtype
        )

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
