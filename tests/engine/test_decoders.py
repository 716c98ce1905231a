"""Both decoders give the model's own logits through joins, leaves, reorders and cache growth."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from app.engine.decoders import Decoder, TransformersDecoder
from app.engine.llama.decoder import LlamaDecoder
from app.engine.llama.kv_cache import ROOM, KVCache
from app.engine.llama.prefixes import PrefixStore
from app.engine.llama.weights import LlamaWeights
from app.engine.loading import load_model
from app.engine.lora import LoraWeights

SHAPE = dict(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip


def llama() -> PreTrainedModel:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)).eval()  # type: ignore[arg-type]


def qwen2() -> PreTrainedModel:
    """Qwen2 has biases on q, k and v, and an untied output layer."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
            layer.self_attn.k_proj.bias.normal_()
    return model


def packed(model: PreTrainedModel) -> Decoder:
    """On packed copies of the weights (the base model's path)."""
    weights = LlamaWeights.of(model, pack=True)
    assert weights is not None
    return LlamaDecoder(weights)


def own_weights(model: PreTrainedModel) -> Decoder:
    """On the model's own weights (a version built during a swap)."""
    weights = LlamaWeights.of(model, pack=False)
    assert weights is not None
    return LlamaDecoder(weights)


def random_lora(model: PreTrainedModel, scale: float = 0.05) -> LoraWeights:
    """A rank-2 LoRA update on every linear layer but one (and the output layer when it is not
    tied to the embeddings), as `read_lora` gives it."""
    generator = torch.Generator().manual_seed(2)
    lora: LoraWeights = {}
    for name, module in model.named_modules():
        adapted = name.startswith("model.layers.") or (
            name == "lm_head" and not model.config.tie_word_embeddings
        )
        if (
            isinstance(module, torch.nn.Linear)
            and adapted
            and not name.endswith("1.self_attn.k_proj")
        ):
            a = torch.randn(2, module.in_features, generator=generator) * scale
            b = torch.randn(module.out_features, 2, generator=generator) * scale
            lora[name] = (a, b, 2.0)
    return lora


def merge(model: PreTrainedModel, lora: LoraWeights) -> PreTrainedModel:
    """`model` with the update merged into its weights."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, (a, b, scaling) in lora.items():
            weight = modules[path].weight
            weight += ((b @ a) * scaling).to(weight.dtype)
    return model


def adapted(model: PreTrainedModel) -> Decoder:
    """On packed copies of the base's weights plus a LoRA update, unmerged (an adapter version);
    `model` becomes the reference: the update merged into its own weights."""
    base = copy.deepcopy(model)
    lora = random_lora(model)
    merge(model, lora)
    weights = LlamaWeights.of(base, pack=True)
    assert weights is not None
    with_lora = weights.adapted(lora)
    assert with_lora is not None
    return LlamaDecoder(with_lora)


def expected(model: PreTrainedModel, sequence: list[int]) -> torch.Tensor:
    """The model's logits after a whole sequence, with no cache, batch or padding."""
    with torch.inference_mode():
        return model(torch.tensor([sequence])).logits[0, -1]


def assert_next_step_is_the_model_s(
    model: PreTrainedModel, decoder: Decoder, first: list[int], second: list[int]
) -> None:
    """One decode step of a decoder's two rows (`first`, `second`, each extended by its token)
    gives the model's own logits for both."""
    step = [first[-1] + 1, second[-1] + 1]
    first.append(step[0])
    second.append(step[1])
    for row, sequence in zip(decoder.decode(step), (first, second), strict=True):
        assert torch.allclose(row, expected(model, sequence), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make_model", [llama, qwen2])
@pytest.mark.parametrize("make_decoder", [packed, own_weights, adapted, TransformersDecoder])
def test_decoder_gives_the_model_s_logits_for_every_row(
    make_model: Callable[[], PreTrainedModel], make_decoder: Callable[[PreTrainedModel], Decoder]
) -> None:
    """Rows prefilled together and alone, joining longer than the batch, leaving, reordered,
    past the cache's first capacity in rows (4) and columns (64): each row's logits stay the
    model's own for that row's tokens."""
    model = make_model()
    decoder = make_decoder(model)
    generator = torch.Generator().manual_seed(1)
    sequences: list[list[int]] = []

    def tokens(n: int) -> list[int]:
        return torch.randint(0, 300, (n,), generator=generator).tolist()

    def check(logits: torch.Tensor) -> None:
        assert logits.shape[0] == len(sequences) == decoder.rows
        for row, sequence in zip(logits, sequences, strict=True):
            assert torch.allclose(row, expected(model, sequence), atol=1e-4, rtol=1e-4)

    def prefill(*lengths: int) -> None:
        prompts = [tokens(n) for n in lengths]
        logits = decoder.prefill([torch.tensor(p) for p in prompts])
        sequences.extend(prompts)
        for row, prompt in zip(logits, prompts, strict=True):
            assert torch.allclose(row, expected(model, prompt), atol=1e-4, rtol=1e-4)

    def decode(steps: int) -> None:
        for _ in range(steps):
            step = tokens(len(sequences))
            for sequence, token in zip(sequences, step, strict=True):
                sequence.append(token)
            check(decoder.decode(step))

    def keep(rows: list[int]) -> None:
        decoder.keep(rows)
        sequences[:] = [sequences[i] for i in rows]

    prefill(5, 9)  # together, with padding
    decode(3)
    prefill(20)  # longer than the batch so far
    decode(2)
    keep([0, 2])
    prefill(3, 4, 2, 6)  # six rows
    decode(70)  # past 64 columns
    keep([3, 1, 0])
    decode(2)
    keep([])
    prefill(7)  # an emptied batch starts again
    decode(2)


def test_the_cache_grows_by_doubling_up_to_what_its_rows_can_reach() -> None:
    """Columns double (few copies) but never past the longest reach plus ROOM, nor the
    context; rows grow by a quarter; `footprint` bounds the bytes before they are taken."""
    cache = KVCache(layers=1, kv_heads=1, head_dim=2, limit=1000)
    per_column = 2 * 1 * 1 * 2 * 4
    assert cache.footprint([150]) == (150 + ROOM) * per_column
    cache.make_room(rows=1, columns=10, reach=[150])
    assert cache.keys[0].shape[2] == 64
    cache.start, cache.length, cache.reach = torch.tensor([0]), 64, [150]
    cache.make_room(rows=1, columns=1)
    assert cache.keys[0].shape[2] == 128
    cache.length = 128
    cache.make_room(rows=1, columns=1)
    assert cache.keys[0].shape[2] == 150 + ROOM  # not 256
    assert cache.footprint() == cache.keys[0].numel() * 2 * 4
    cache.make_room(rows=8, columns=0, reach=[150] * 7)
    assert cache.keys[0].shape[:3] == (10, 1, 150 + ROOM)
    long = KVCache(layers=1, kv_heads=1, head_dim=2, limit=100)
    assert long.footprint([5000]) == 100 * per_column  # the context caps it


def test_the_cache_shrinks_when_the_rows_that_needed_it_leave() -> None:
    """A long row that leaves gives its columns back; so do many rows that leave."""
    cache = KVCache(layers=2, kv_heads=1, head_dim=2, limit=10_000)
    cache.make_room(rows=12, columns=2000, reach=[3000] + [100] * 11)
    cache.start = torch.tensor([0] + [1900] * 11)
    cache.length, cache.reach = 2000, [3000] + [100] * 11
    cache.keys[0][5, 0, 1999] = torch.tensor([1.0, 2.0])
    before = cache.footprint()
    cache.keep(list(range(1, 12)))  # the long row leaves
    assert cache.keys[0].shape[2] <= 2 * (100 + ROOM) and cache.footprint() < before / 10
    assert cache.keys[0][4, 0, cache.length - 1].tolist() == [1.0, 2.0]  # data kept in place
    cache.keep([0])
    assert cache.keys[0].shape[0] == 1


def test_llama_family_versions_take_their_own_path_and_others_transformers() -> None:
    """Llama and Qwen2 decode on `app/engine/llama/`; any other causal LM on its own forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from app.engine.decoders import decoder_for
    from app.engine.registry import ServingVersion

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4)).eval()
    for model, path in (
        (llama(), LlamaDecoder),
        (qwen2(), LlamaDecoder),
        (gpt2, TransformersDecoder),
    ):
        version = ServingVersion(1, "v", model, tokenizer=None)  # type: ignore[arg-type]
        assert isinstance(decoder_for(version), path)
    decoder = decoder_for(ServingVersion(1, "v", gpt2, tokenizer=None))  # type: ignore[arg-type]
    logits = decoder.prefill([torch.tensor([5, 6, 7]), torch.tensor([8, 9])])
    assert torch.allclose(logits[1], expected(gpt2, [8, 9]), atol=1e-4, rtol=1e-4)
    assert torch.allclose(decoder.decode([3, 4])[0], expected(gpt2, [5, 6, 7, 3]), atol=1e-4)


def on_a_4bit_grid(model: PreTrainedModel) -> PreTrainedModel:
    """The model with each decoder weight rounded to 16 evenly spaced values per 32 inputs, as
    a Q4_1 GGUF holds them (the default model comes from one)."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *mlp.children()):
                if isinstance(linear, torch.nn.Linear):
                    blocks = linear.weight.view(linear.out_features, -1, 32)
                    low = blocks.amin(-1, keepdim=True)
                    step = (blocks.amax(-1, keepdim=True) - low) / 15
                    linear.weight.copy_(
                        (((blocks - low) / step).round() * step + low).view_as(linear.weight)
                    )
    return model


def test_weights_already_on_4_bits_decode_in_4_bits_and_give_the_model_s_logits() -> None:
    """bf16 weights on a 4-bit grid run a decode step on the int4 kernel (prefill on their own
    weights); the logits stay the model's own, as close as bf16 allows. Weights off the grid
    never do: quantising them would change the model."""
    model = on_a_4bit_grid(llama()).to(torch.bfloat16)
    weights = LlamaWeights.of(model)
    assert weights is not None and weights.four_bit == 4 * len(weights.layers)
    off_grid = LlamaWeights.of(llama().to(torch.bfloat16))
    assert off_grid is not None and off_grid.four_bit == 0

    decoder = LlamaDecoder(weights)
    sequences = [[5, 17, 33, 9, 120], [7, 250]]
    decoder.prefill([torch.tensor(s) for s in sequences])
    for step in ([11, 12], [13, 14], [15, 16]):
        logits = decoder.decode(step)
        for row, sequence, token in zip(logits, sequences, step, strict=True):
            sequence.append(token)
            own = expected(model, sequence).float()
            assert torch.allclose(row.float(), own, atol=0.02, rtol=0.02)
            assert int(row.argmax()) == int(own.argmax())


def test_a_lora_update_on_4_bit_weights_decodes_as_the_merged_float32_model() -> None:
    """An adapter version on the base's bf16 4-bit path, its update unmerged in float32, gives
    the logits of the update merged into float32 weights, as close as the base's own bf16 steps
    give the base's; so the update is kept, not lost to bf16's rounding."""
    base = on_a_4bit_grid(llama())
    lora = random_lora(base, scale=0.03)
    merged = merge(copy.deepcopy(base), lora)
    weights = LlamaWeights.of(copy.deepcopy(base).to(torch.bfloat16))
    assert weights is not None and weights.four_bit
    with_lora = weights.adapted(lora)
    assert with_lora is not None
    assert weights.adapted({**lora, "model.norm": lora["model.layers.0.mlp.up_proj"]}) is None

    sequence = [5, 17, 33, 9, 120, 7, 250, 3]
    decoder = LlamaDecoder(with_lora)
    decoder.prefill([torch.tensor(sequence[:4])])
    for token in sequence[4:]:
        logits = decoder.decode([token])[0]
    want, unadapted = expected(merged, sequence), expected(base, sequence)
    error = (logits - want).abs().max()
    assert error < 0.02 and error < 0.2 * (want - unadapted).abs().max()
    assert int(logits.argmax()) == int(want.argmax())


@pytest.mark.parametrize("make_decoder", [packed, own_weights, adapted])
def test_prompts_that_start_alike_reuse_stored_keys_and_give_the_model_s_logits(
    make_decoder: Callable[[PreTrainedModel], Decoder],
) -> None:
    """A prompt sharing its start with an earlier one (a system prompt, the same prompt again)
    computes only the rest, in a group with other reuse lengths, and prompts arriving together
    compute their shared start once; each row's logits stay the model's own, at prefill and in
    the decode steps after."""
    model = llama()
    decoder = make_decoder(model)
    assert isinstance(decoder, LlamaDecoder)
    generator = torch.Generator().manual_seed(3)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, 300, (n,), generator=generator).tolist()

    widths: list[int] = []  # tokens a row each prefill computes
    hook = decoder.weights.model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: widths.append(args[0].shape[1])
    )
    system = tokens(20)
    first = system + tokens(5)
    sequences = [first]
    decoder.prefill([torch.tensor(first)])
    group = [system + tokens(3), system + tokens(9), list(first)]  # 3, 9 and 1 computed
    sequences += group
    logits = decoder.prefill([torch.tensor(p) for p in group])
    alone = tokens(12)
    sequences.append(alone)
    logits = torch.cat([logits, decoder.prefill([torch.tensor(alone)])])
    fresh = tokens(15)  # a start nobody sent before, shared by prompts arriving together
    together = [fresh + tokens(4), fresh + tokens(6)]
    sequences += together
    logits = torch.cat([logits, decoder.prefill([torch.tensor(p) for p in together])])
    hook.remove()
    assert widths == [25, 9, 12, 15, 6]  # the shared start once, then what differs
    for row, sequence in zip(logits, sequences[1:], strict=True):
        assert torch.allclose(row, expected(model, sequence), atol=1e-4, rtol=1e-4)
    for _ in range(3):
        step = tokens(len(sequences))
        for sequence, token in zip(sequences, step, strict=True):
            sequence.append(token)
        for row, sequence in zip(decoder.decode(step), sequences, strict=True):
            assert torch.allclose(row, expected(model, sequence), atol=1e-4, rtol=1e-4)


def test_without_reuse_a_stored_prompt_is_computed_whole_and_repeats_its_first_pass() -> None:
    """What seeded requests rely on: a prompt prefilled without reuse is computed whole even
    though the store holds it, with the same logits, bit for bit, as its first pass."""
    model = llama()
    weights = LlamaWeights.of(model)
    assert weights is not None
    widths: list[int] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: widths.append(args[0].shape[1])
    )
    prompt = torch.arange(3, 40)
    first = LlamaDecoder(weights).prefill([prompt])
    reused = LlamaDecoder(weights).prefill([prompt])
    running = LlamaDecoder(weights)
    running.prefill([torch.arange(50, 60)])
    again = running.prefill([prompt], reuse=False)
    hook.remove()
    assert widths == [37, 1, 10, 37]
    assert torch.equal(again, first)
    assert torch.allclose(reused, first, atol=1e-5)


def test_the_prefix_store_keeps_recent_prompts_within_its_budget() -> None:
    """A prompt replaces stored prompts it starts with; the least recently used go first."""
    store = PrefixStore(budget=30)
    kv = torch.zeros(1, 1, 1, 1)
    store.add(list(range(10)), kv, kv)
    store.add(list(range(12)), kv, kv)  # starts with the first: replaces it
    assert store.tokens == 12 and store.covers(list(range(11)))
    store.add([7] * 10, kv, kv)
    assert store.longest(list(range(20)))[1] == 12  # used: now the most recent
    store.add([9] * 10, kv, kv)  # 32 tokens: the least recently used ([7] * 10) goes
    assert store.tokens == 22 and not store.covers([7] * 10)
    assert store.longest([1] * 20) == (None, 0)
    assert store.longest([0, 1, 2, 3, 4, 99])[1] == 0  # shares 5, fewer than MIN_REUSE


@pytest.mark.parametrize("make_model", [llama, qwen2])
@pytest.mark.parametrize("make_decoder", [packed, adapted, TransformersDecoder])
def test_a_long_prompt_prefilled_in_chunks_gives_the_model_s_logits(
    make_model: Callable[[], PreTrainedModel], make_decoder: Callable[[PreTrainedModel], Decoder]
) -> None:
    """Chunk by chunk beside a row that keeps decoding, from a stored start or from nothing:
    the joined row's logits, and the next step's, are the model's own."""
    model = make_model()
    decoder = make_decoder(model)
    generator = torch.Generator().manual_seed(5)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, SHAPE["vocab_size"], (n,), generator=generator).tolist()

    running = tokens(7)
    decoder.prefill([torch.tensor(running)])
    shared = tokens(30)
    if isinstance(decoder, LlamaDecoder):  # stores `shared` for the first long prompt
        LlamaDecoder(decoder.weights).prefill([torch.tensor(shared + tokens(2))])
    for long, reused in ((shared + tokens(70), 30), (tokens(90), 0)):
        partial = decoder.begin(torch.tensor(long), reach=len(long) + 10)
        steps = 0
        while (logits := decoder.advance(partial, 16)) is None:
            steps += 1
            running.append(tokens(1)[0])
            (row,) = decoder.decode([running[-1]])
            assert torch.allclose(row, expected(model, running), atol=1e-4, rtol=1e-4)
            assert decoder.footprint() >= decoder.allocated
        assert torch.allclose(logits[0], expected(model, long), atol=1e-4, rtol=1e-4)
        if isinstance(decoder, LlamaDecoder):
            assert steps == -(-(len(long) - reused - 16) // 16)  # a chunk a step
        assert_next_step_is_the_model_s(model, decoder, running, long)
        decoder.keep([0])


def test_a_longer_prompt_joins_after_the_cache_has_compacted() -> None:
    """Found in review: joining rows computed how far to shift before making room, and making
    room can move the used columns to the front; the join then wrote before column 0."""
    model = llama()
    weights = LlamaWeights.of(model)
    assert weights is not None
    decoder = LlamaDecoder(weights)
    generator = torch.Generator().manual_seed(9)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, SHAPE["vocab_size"], (n,), generator=generator).tolist()

    sequences = [tokens(100), tokens(10)]
    decoder.prefill([torch.tensor(s) for s in sequences], reach=[130, 130])
    for _ in range(20):
        step = tokens(len(sequences))
        for sequence, token in zip(sequences, step, strict=True):
            sequence.append(token)
        decoder.decode(step)
    decoder.keep([1])
    sequences = [sequences[1], tokens(150), tokens(150)]
    logits = decoder.prefill([torch.tensor(s) for s in sequences[1:]], reach=[200, 200])
    for row, sequence in zip(logits, sequences[1:], strict=True):
        assert torch.allclose(row, expected(model, sequence), atol=1e-4, rtol=1e-4)
    step = tokens(3)
    for sequence, token in zip(sequences, step, strict=True):
        sequence.append(token)
    for row, sequence in zip(decoder.decode(step), sequences, strict=True):
        assert torch.allclose(row, expected(model, sequence), atol=1e-4, rtol=1e-4)


def test_a_decode_step_run_a_layer_at_a_time_gives_the_logits_of_one_run_whole(
    tiny_model_dir: Path,
) -> None:
    """A long batch's step runs in parts between other batches' steps; the parts compute the
    same products in the same order, so the logits are exactly those of a whole step."""
    model, _ = load_model(tiny_model_dir, torch.float32)
    weights = LlamaWeights.of(model)
    assert weights is not None
    decoders = [LlamaDecoder(weights), LlamaDecoder(weights)]
    prompts = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11])]
    for decoder in decoders:
        decoder.prefill(prompts, reuse=False)
    whole = decoders[0].decode([3, 4])
    step = decoders[1].start_decode([3, 4])
    parts = [step.run(1) for _ in range(step.layers)]
    assert all(part is None for part in parts[:-1]) and step.left == 0
    assert parts[-1] is not None and torch.equal(parts[-1], whole)
    assert torch.equal(decoders[1].decode([1, 2]), decoders[0].decode([1, 2]))


def test_a_long_prompt_s_last_chunk_joins_the_rows_a_layer_at_a_time() -> None:
    """Found with bench/abuse.py: a long prompt's last chunk, with the row's room made and its
    stored keys copied, ran whole (130-340 ms on 2 cores for 2,315 tokens) while every chat
    waited. It runs a layer at a time like any chunk, with the model's logits; dropped half-way,
    it leaves the rows as they were."""
    model = llama()
    weights = LlamaWeights.of(model)
    assert weights is not None
    decoder = LlamaDecoder(weights)
    generator = torch.Generator().manual_seed(13)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, SHAPE["vocab_size"], (n,), generator=generator).tolist()

    running = tokens(9)
    decoder.prefill([torch.tensor(running)], reach=[200])
    for long, join in ((tokens(60), True), (tokens(70), False)):
        partial = decoder.begin(torch.tensor(long), reach=len(long) + 10)
        while partial.left > 16:
            decoder.start_chunk(partial, 16).run()
        step = decoder.start_chunk(partial, partial.left)
        if not join:
            assert step.run(1) is None
            decoder.drop(partial)
            assert decoder.rows == 1 and not decoder.partials
            running.append(tokens(1)[0])
            (row,) = decoder.decode([running[-1]])
            assert torch.allclose(row, expected(model, running), atol=1e-4, rtol=1e-4)
            continue
        parts = [step.run(1) for _ in range(step.layers)]
        assert all(part is None for part in parts[:-1]) and step.left == 0
        logits = parts[-1]
        assert logits is not None and decoder.rows == 2
        assert torch.allclose(logits[0], expected(model, long), atol=1e-4, rtol=1e-4)
        assert_next_step_is_the_model_s(model, decoder, running, long)
        decoder.keep([0])


def test_a_bfloat16_kv_cache_takes_half_the_bytes_and_follows_the_float32_one() -> None:
    """KV_CACHE_DTYPE=bfloat16: every way a row gets its keys (prefill, a stored prefix, chunks,
    decode steps) stores them in bfloat16, at half the bytes a token, and the logits stay
    within bfloat16's rounding of the float32 cache's."""
    model = llama()
    decoders = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = LlamaWeights.of(model, kv_dtype=dtype)
        assert weights is not None
        decoders[dtype] = LlamaDecoder(weights)
    full, half = decoders[torch.float32], decoders[torch.bfloat16]
    assert half.cache.bytes_per_column * 2 == full.cache.bytes_per_column
    generator = torch.Generator().manual_seed(21)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, SHAPE["vocab_size"], (n,), generator=generator).tolist()

    shared, running = tokens(40), tokens(12)
    long = shared + tokens(50)

    def run(decoder: LlamaDecoder) -> list[torch.Tensor]:
        out = [decoder.prefill([torch.tensor(running), torch.tensor(shared + tokens(3))])]
        partial = decoder.begin(torch.tensor(long), reach=len(long) + 10)
        while (logits := decoder.advance(partial, 16)) is None:
            out.append(decoder.decode([7, 8]))
        out += [logits, decoder.decode([9, 10, 11])]
        return out

    state = generator.get_state()
    expected_logits = run(full)
    generator.set_state(state)
    got = run(half)
    assert all(buffer.dtype == torch.bfloat16 for buffer in half.cache.keys)
    assert len(got) == len(expected_logits)
    for mine, theirs in zip(got, expected_logits, strict=True):
        scale = float(theirs.abs().max())
        assert float((mine - theirs).abs().max()) <= 0.005 * scale  # seen: up to 0.0004
        assert torch.equal(mine.argmax(-1), theirs.argmax(-1))


def test_the_kv_cache_dtype_is_the_base_version_s_and_its_adapters(tiny_model_dir: Path) -> None:
    """KV_CACHE_DTYPE reaches the decode path of the base, and of a trained version built on it
    (it decodes on the base's weights)."""
    from app.engine.versions import build_base_version

    base = build_base_version(1, "v0", tiny_model_dir, "float32", "bfloat16")
    assert base.kv_dtype == torch.bfloat16
    assert base.llama is not None and base.llama.kv_dtype == torch.bfloat16
    adapted = base.llama.adapted(random_lora(base.model))
    assert adapted is not None and adapted.kv_dtype == torch.bfloat16
    assert LlamaDecoder(adapted).cache.dtype == torch.bfloat16
    default = build_base_version(1, "v0", tiny_model_dir, "float32")
    assert default.llama is not None and default.llama.kv_dtype == torch.float32
