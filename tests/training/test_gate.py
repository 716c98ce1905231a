"""The promotion gate on the tiny model and on constructed numbers: the truncation rule, token
budgeted batches, log-probabilities in chunks, and every reason it rejects a candidate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.training_config import GateConfig, TokenBudget, token_batches
from worker.training.gate import (
    completion_logprobs,
    evaluate,
    judge,
    kl_to_base,
    repetition,
)

SMALL = TokenBudget(max_length=128, max_prompt_length=64, batch_tokens=384, chunk_tokens=32)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.numel = max(self.numel, leaf.numel())
        return out


def long_items(count: int, words: int = 300) -> list[tuple[str, str]]:
    """Maximal ratings: prompts and answers far longer than the budget (about a token a word)."""
    return [
        (" ".join(f"question{i} word{j}" for j in range(words)),
         " ".join(f"answer{i} word{j}" for j in range(words)))
        for i in range(count)
    ]  # fmt: skip


def naive_score(model: Any, tokenizer: Any, prompt: str, completion: str) -> float:
    """The mean log-probability the old way (whole logits), on the rule's truncated tokens."""
    prompt_ids, answer_ids = SMALL.truncate(
        tokenizer(prompt, add_special_tokens=False).input_ids,
        [*tokenizer(completion, add_special_tokens=False).input_ids, tokenizer.eos_token_id],
    )
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    picked = logprobs.gather(1, ids[0, 1:, None]).squeeze(1)
    return float(picked[len(prompt_ids) - 1 :].mean())


def test_the_truncation_rule_keeps_the_prompts_end_and_the_answers_start() -> None:
    """Prompt: its last max_prompt_length tokens; answer: the rest of max_length, at least
    max_answer_tokens + EOS whatever the prompt."""
    budget = TokenBudget(max_length=16, max_prompt_length=6, batch_tokens=32)
    assert budget.truncate(list(range(20)), list(range(100, 130))) == (
        list(range(14, 20)),
        list(range(100, 110)),
    )
    assert budget.truncate([1, 2], list(range(100, 130))) == ([1, 2], list(range(100, 114)))
    assert budget.truncate([1, 2], [7]) == ([1, 2], [7])
    assert budget.max_answer_tokens == 9
    # A correction the API accepts (max_answer_tokens) keeps all of it and its EOS after any
    # prompt: the API's cap and this rule agree.
    correction = [*range(200, 200 + budget.max_answer_tokens), 2]
    for prompt_length in range(40):
        assert budget.truncate(list(range(prompt_length)), correction)[1] == correction
    with pytest.raises(ValueError, match="max_prompt_length must be below"):
        TokenBudget(max_length=16, max_prompt_length=16, batch_tokens=32)
    with pytest.raises(ValueError, match="at least twice max_length"):
        TokenBudget(max_length=512, batch_tokens=1000)


def test_the_gate_scores_only_what_the_rule_keeps(model: Any, tokenizer: Any) -> None:
    """Text before the kept end of the prompt, or after the kept start of the answer, does not
    change a held-out score (before, the gate scored whole sequences)."""
    prompt, answer = long_items(1)[0]
    scores = completion_logprobs(
        model, tokenizer,
        [(prompt, answer), ("other words " * 50 + prompt, answer + " and more" * 50)],
        SMALL,
    )  # fmt: skip
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)
    assert scores[0] == pytest.approx(naive_score(model, tokenizer, prompt, answer), abs=1e-4)


def test_gate_logprobs_never_build_batch_by_length_by_vocabulary_logits(
    model: Any, tokenizer: Any
) -> None:
    """Twenty maximal ratings: no tensor exceeds chunk_tokens x vocabulary, and the scores are
    those of the whole-logits computation on the truncated rows."""
    items = long_items(20)
    vocabulary = model.config.vocab_size
    with LargestTensor() as largest:
        scores = completion_logprobs(model, tokenizer, items, SMALL)
    print(
        f"largest tensor: {largest.numel:,} elements ({largest.numel * 4 / 2**20:.1f} MiB in "
        f"float32); whole logits would be {20 * SMALL.max_length * vocabulary * 4 / 2**20:.0f} MiB"
    )
    assert largest.numel <= SMALL.chunk_tokens * vocabulary
    for (prompt, answer), score in zip(items[:3], scores, strict=False):
        assert score == pytest.approx(naive_score(model, tokenizer, prompt, answer), abs=1e-4)


def test_gate_batches_are_formed_by_a_token_budget(model: Any, tokenizer: Any) -> None:
    """Every forward pass holds at most batch_tokens padded tokens, short rows many to a batch."""
    shapes: list[tuple[int, int]] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        items = [*long_items(5), *[(f"Short question {i}?", "Short.") for i in range(12)]]
        completion_logprobs(model, tokenizer, items, SMALL)
    finally:
        hook.remove()
    assert sum(rows for rows, _ in shapes) == len(items)
    assert all(rows * width <= SMALL.batch_tokens for rows, width in shapes), shapes
    assert max(rows for rows, _ in shapes) > 8  # short rows share one pass


def test_token_batches_group_longest_first_within_the_budget() -> None:
    """Rows x the longest row stays within the budget; a row over it goes alone."""
    lengths = [10, 300, 5, 200, 90, 90, 500]
    batches = token_batches(lengths, 400)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than the budget: alone
    for batch in batches[1:]:
        assert len(batch) * max(lengths[i] for i in batch) <= 400


def test_kl_is_computed_in_chunks_and_is_zero_for_a_fresh_adapter(
    model: Any, tokenizer: Any
) -> None:
    """KL along the candidate's answers never builds more than chunk x vocabulary logits; an
    adapter that has not moved (LoRA B is zero) is at KL 0 from the base."""
    candidate = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ).eval()
    answers = [list(range(1000, 1100)), [5, 6, 7]]
    with LargestTensor() as largest:
        kl = kl_to_base(candidate, tokenizer, ["Hello there", "Hi"], answers, chunk_tokens=16)
    assert kl == pytest.approx(0.0, abs=1e-6)
    assert largest.numel <= 16 * model.config.vocab_size


NUMBERS: dict[str, Any] = {
    "preference_gain": 0.1,
    "kl_to_base": 0.01,
    "repetition": 0.1,
    "repetition_active": 0.1,
    "empty_fraction": 0.0,
    "empty_fraction_active": 0.0,
    "length_ratio": 1.0,
}
"""Gate numbers of a candidate that passes with the default thresholds."""


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"preference_gain": None}, "no held-out feedback to evaluate the candidate on"),
        ({"preference_gain": 0.0}, "held-out preference gain 0.0000 is not above 0.0"),
        ({"preference_gain": -0.2}, "held-out preference gain -0.2000 is not above 0.0"),
        ({"kl_to_base": 0.6}, "KL to the base model 0.6000 exceeds 0.5"),
        ({"repetition": 0.55}, "repeated text: 0.55 of 4-grams repeat"),
        ({"empty_fraction": 0.5}, "empty answers: 0.50 of the fixed prompts"),
        ({"length_ratio": 0.4}, "answer length drifted: 0.40 times the active version's"),
        ({"length_ratio": 2.5}, "answer length drifted: 2.50 times the active version's"),
        ({"length_ratio": float("inf")}, "answer length drifted: inf times the active version's"),
    ],
)
def test_each_gate_rejection_reason(change: dict[str, Any], reason: str) -> None:
    """Each number past its threshold rejects with its own reason, and only that one."""
    numbers = {**NUMBERS, **change}
    if numbers["preference_gain"] is None:
        del numbers["preference_gain"]
    assert judge(NUMBERS, GateConfig()) == []
    reasons = judge(numbers, GateConfig())
    assert len(reasons) == 1 and reasons[0].startswith(reason), reasons


def test_repetition_and_empty_limits_are_relative_to_the_active_version() -> None:
    """An active version that already repeats or answers empty raises the bar to its own level."""
    config = GateConfig()
    assert judge({**NUMBERS, "repetition": 0.65, "repetition_active": 0.6}, config) == []
    assert judge({**NUMBERS, "repetition": 0.75, "repetition_active": 0.6}, config) == [
        "repeated text: 0.75 of 4-grams repeat"
    ]
    assert judge({**NUMBERS, "empty_fraction": 0.5, "empty_fraction_active": 0.5}, config) == []
    assert repetition([[1, 2, 3, 4] * 3]) == pytest.approx(5 / 9)
    assert repetition([[1, 2, 3]]) == 0.0


def test_a_candidate_with_no_held_out_ratings_is_rejected_on_the_tiny_model(
    model: Any, tokenizer: Any
) -> None:
    """The whole gate on the tiny model: no held-out rows is its own reason; the other numbers
    are measured and an unmoved adapter is at KL 0 with the active's length and repetition."""
    candidate = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ).eval()
    result = evaluate(candidate, None, tokenizer, [], [], GateConfig(max_new_tokens=6), SMALL)
    assert not result.passed
    assert result.reasons == ["no held-out feedback to evaluate the candidate on"]
    assert result.metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["length_ratio"] == 1.0
    assert result.metrics["token_budget"] == SMALL.to_dict()
