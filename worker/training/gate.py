"""The promotion gate: a candidate must beat the active version on held-out ratings, stay close to
the base model, and not degenerate, before it serves anyone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from app.ml.training_config import GateConfig
from app.services.datasets import KtoRow, PairRow

FIXED_PROMPTS = (
    "What is the capital of Italy?",
    "Write one sentence about the sea.",
    "Translate to French: Good morning, my friend.",
    "Give me three tips for sleeping better.",
    "Explain what a prime number is.",
    "Summarise the plot of Cinderella in two sentences.",
    "What is 12 times 7?",
    "Suggest a name for a small bakery.",
)
"""Prompts the gate generates from, to measure KL to the base and degeneration."""


@dataclass
class GateResult:
    """The verdict, why, and every number behind it."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def completion_logprobs(
    model: Any, tokenizer: Any, items: Sequence[tuple[str, str]], batch_size: int = 8
) -> list[float]:
    """Mean per-token log-probability of each completion (ending with EOS) after its prompt."""
    scores: list[float] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        sequences, prompt_lengths = [], []
        for prompt, completion in batch:
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            completion_ids = [*tokenizer(completion, add_special_tokens=False).input_ids, eos]
            sequences.append(prompt_ids + completion_ids)
            prompt_lengths.append(len(prompt_ids))
        width = max(map(len, sequences))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_logprobs = logprobs.gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, (sequence, prompt_length) in enumerate(
            zip(sequences, prompt_lengths, strict=True)
        ):
            span = token_logprobs[row, prompt_length - 1 : len(sequence) - 1]
            scores.append(float(span.mean()))
    return scores


@torch.inference_mode()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int
) -> list[list[int]]:
    """Greedy continuations (token ids, EOS and padding removed) of already rendered prompts."""
    answers: list[list[int]] = []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]), add_special_tokens=False,
                return_tensors="pt", padding=True,
            )  # fmt: skip
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            for row in output[:, batch.input_ids.shape[1] :].tolist():
                answers.append(
                    [t for t in row if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
                )
    finally:
        tokenizer.padding_side = previous_side
    return answers


@torch.inference_mode()
def kl_to_base(
    candidate: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[list[int]]
) -> float:
    """Mean per-token KL(candidate || base) along the candidate's own answers."""
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers, strict=True):
        if not answer:
            continue
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + answer])
        positions = slice(len(prompt_ids) - 1, ids.shape[1] - 1)
        policy = torch.log_softmax(candidate(input_ids=ids).logits[0, positions].float(), -1)
        with candidate.disable_adapter():
            base = torch.log_softmax(candidate(input_ids=ids).logits[0, positions].float(), -1)
        kl = F.kl_div(base, policy, log_target=True, reduction="none").sum(-1)
        total += float(kl.sum())
        count += kl.numel()
    return total / count if count else 0.0


def repetition(answers: Sequence[list[int]], n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same answer, over all answers."""
    repeated = total = 0
    for answer in answers:
        grams = [tuple(answer[i : i + n]) for i in range(len(answer) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def evaluate(
    candidate: Any,
    active: Any | None,
    tokenizer: Any,
    heldout_kto: Sequence[KtoRow],
    heldout_pairs: Sequence[PairRow],
    config: GateConfig,
) -> GateResult:
    """Compare a candidate with the active version (None: the base, i.e. adapters disabled)."""
    result = GateResult(passed=True, metrics={"gate": config.to_dict()})
    metrics = result.metrics

    @contextlib.contextmanager
    def as_active() -> Iterator[Any]:
        if active is not None:
            yield active
        else:
            with candidate.disable_adapter():
                yield candidate

    def score(items: list[tuple[str, str]]) -> tuple[list[float], list[float]]:
        mine = completion_logprobs(candidate, tokenizer, items, config.batch_size)
        with as_active() as model:
            theirs = completion_logprobs(model, tokenizer, items, config.batch_size)
        return mine, theirs

    gains: list[tuple[float, int]] = []
    if heldout_kto:
        mine, theirs = score([(row.prompt, row.completion) for row in heldout_kto])
        deltas = [m - t for m, t in zip(mine, theirs, strict=True)]
        good = [d for d, row in zip(deltas, heldout_kto, strict=True) if row.label]
        bad = [d for d, row in zip(deltas, heldout_kto, strict=True) if not row.label]
        kto_gain = (_mean(good) if good else 0.0) - (_mean(bad) if bad else 0.0)
        metrics["heldout_kto"] = len(heldout_kto)
        metrics["kto_gain"] = kto_gain
        gains.append((kto_gain, len(heldout_kto)))
    if heldout_pairs:
        chosen_mine, chosen_theirs = score([(p.prompt, p.chosen) for p in heldout_pairs])
        rejected_mine, rejected_theirs = score([(p.prompt, p.rejected) for p in heldout_pairs])
        margin_mine = [c - r for c, r in zip(chosen_mine, rejected_mine, strict=True)]
        margin_theirs = [c - r for c, r in zip(chosen_theirs, rejected_theirs, strict=True)]
        metrics["heldout_pairs"] = len(heldout_pairs)
        metrics["pair_accuracy_candidate"] = _mean([float(m > 0) for m in margin_mine])
        metrics["pair_accuracy_active"] = _mean([float(m > 0) for m in margin_theirs])
        pair_gain = _mean([m - t for m, t in zip(margin_mine, margin_theirs, strict=True)])
        metrics["pair_gain"] = pair_gain
        gains.append((pair_gain, len(heldout_pairs)))
    if not gains:
        result.passed = False
        result.reasons.append("no held-out feedback to evaluate the candidate on")
    else:
        gain = sum(g * n for g, n in gains) / sum(n for _, n in gains)
        metrics["preference_gain"] = gain
        if gain <= config.min_preference_gain:
            result.passed = False
            result.reasons.append(
                f"held-out preference gain {gain:.4f} is not above {config.min_preference_gain}: "
                "the candidate does not prefer what raters preferred more than the active version"
            )

    prompts = [_render(tokenizer, p) for p in FIXED_PROMPTS]
    new = greedy_answers(candidate, tokenizer, prompts, config.max_new_tokens, config.batch_size)
    with as_active() as model:
        old = greedy_answers(model, tokenizer, prompts, config.max_new_tokens, config.batch_size)
    kl = kl_to_base(candidate, tokenizer, prompts, new)
    metrics["kl_to_base"] = kl
    if kl > config.max_kl:
        result.passed = False
        result.reasons.append(f"KL to the base model {kl:.4f} exceeds {config.max_kl}")

    metrics["repetition"] = repetition(new)
    metrics["repetition_active"] = repetition(old)
    repetition_limit = max(config.max_repetition, metrics["repetition_active"] + 0.1)
    if metrics["repetition"] > repetition_limit:
        result.passed = False
        result.reasons.append(f"repeated text: {metrics['repetition']:.2f} of 4-grams repeat")
    metrics["empty_fraction"] = _mean([float(not tokenizer.decode(a).strip()) for a in new])
    empty_active = _mean([float(not tokenizer.decode(a).strip()) for a in old])
    if metrics["empty_fraction"] > max(config.max_empty_fraction, empty_active):
        result.passed = False
        result.reasons.append(
            f"empty answers: {metrics['empty_fraction']:.2f} of the fixed prompts"
        )
    length_new, length_old = _mean([len(a) for a in new]), _mean([len(a) for a in old])
    ratio = length_new / length_old if length_old else (1.0 if not length_new else float("inf"))
    metrics["length_ratio"] = ratio
    if not config.min_length_ratio <= ratio <= config.max_length_ratio:
        result.passed = False
        result.reasons.append(f"answer length drifted: {ratio:.2f} times the active version's")
    return result


def _render(tokenizer: Any, message: str) -> str:
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
