"""The promotion gate: a candidate must beat the active version on held-out ratings, stay close to
the base model, and not degenerate, before it serves anyone."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from app.services.datasets import KtoRow, PairRow
from app.training_config import GateConfig, TokenBudget, token_batches
from worker.training.batches import OnBatch, no_batches, ratings_of

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


def _backbone_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack (LoRA layers included) and the output projection of a causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def device_of(model: Any) -> torch.device:
    """Where a model's weights are: the gate's inputs go there (a GPU after training on one)."""
    return next(model.parameters()).device


def _chunked_logprobs(
    head: Any, states: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """log p(target) at each position, projecting `chunk_tokens` positions to the vocabulary at a
    time, so that logits never exceed [chunk_tokens, vocabulary]."""
    out = torch.empty(len(targets), device=states.device)
    for start in range(0, len(targets), chunk_tokens):
        logits = head(states[start : start + chunk_tokens]).float()
        picked = logits.gather(1, targets[start : start + chunk_tokens, None]).squeeze(1)
        out[start : start + chunk_tokens] = picked - torch.logsumexp(logits, -1)
    return out


@torch.inference_mode()
def completion_logprobs(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    budget: TokenBudget = TokenBudget(),
    on_batch: Callable[[list[int] | None], None] = lambda batch: None,
) -> list[float]:
    """Mean per-token log-probability of each completion (ending with EOS) after its prompt, both
    cut by the truncation rule, in batches of at most `budget.batch_tokens` padded tokens;
    `on_batch` is told the indices of each batch's items before it is computed on, and None
    once it is done."""
    encoded = [budget.encode(tokenizer, prompt, completion) for prompt, completion in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    backbone, head = _backbone_and_head(model)
    device = device_of(model)
    scores = [0.0] * len(items)
    for batch in token_batches([len(ids) for ids, _ in encoded], budget.batch_tokens):
        on_batch(batch)
        width = len(encoded[batch[0]][0])
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows: list[int] = []
        positions: list[int] = []
        for row, index in enumerate(batch):
            sequence, prompt_length = encoded[index]
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
            # Position p predicts token p + 1; without a prompt the first token has no predictor.
            span = range(max(prompt_length, 1) - 1, len(sequence) - 1)
            rows += [row] * len(span)
            positions += span
        ids, mask = ids.to(device), mask.to(device)
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        row_index, position_index = torch.tensor(rows), torch.tensor(positions)
        on_device = row_index.to(device), position_index.to(device)
        logprobs = _chunked_logprobs(
            head, hidden[on_device], ids[on_device[0], on_device[1] + 1], budget.chunk_tokens
        ).cpu()
        for row, index in enumerate(batch):
            scores[index] = float(logprobs[row_index == row].mean())
        on_batch(None)
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
            ).to(device_of(model))  # fmt: skip
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            for row in output[:, batch["input_ids"].shape[1] :].tolist():
                answers.append(
                    [t for t in row if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
                )
    finally:
        tokenizer.padding_side = previous_side
    return answers


@torch.inference_mode()
def kl_to_base(
    candidate: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[list[int]],
    chunk_tokens: int = TokenBudget().chunk_tokens,
) -> float:
    """Mean per-token KL(candidate || base) along the candidate's own answers, projecting
    `chunk_tokens` positions to the vocabulary at a time."""
    backbone, head = _backbone_and_head(candidate)
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers, strict=True):
        if not answer:
            continue
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + answer], device=device_of(candidate))
        positions = slice(len(prompt_ids) - 1, ids.shape[1] - 1)
        policy_states = backbone(input_ids=ids, use_cache=False).last_hidden_state[0, positions]
        with candidate.disable_adapter():
            base_states = backbone(input_ids=ids, use_cache=False).last_hidden_state[0, positions]
        for start in range(0, len(answer), chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            policy = torch.log_softmax(head(policy_states[chunk]).float(), -1)
            base = torch.log_softmax(head(base_states[chunk]).float(), -1)
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
    budget: TokenBudget = TokenBudget(),
    on_batch: OnBatch = no_batches,
) -> GateResult:
    """Compare a candidate with the active version (None: the base, i.e. adapters disabled);
    `on_batch` is told the ratings of each batch of held-out rows as it is scored (the fixed
    prompts hold none)."""
    metrics: dict[str, Any] = {"gate": config.to_dict(), "token_budget": budget.to_dict()}
    if active is not None:  # loaded on the CPU, where the candidate may have left for a GPU
        active = active.to(device_of(candidate))

    @contextlib.contextmanager
    def as_active() -> Iterator[Any]:
        if active is not None:
            yield active
        else:
            with candidate.disable_adapter():
                yield candidate

    def score(
        items: list[tuple[str, str]], rows: Sequence[KtoRow | PairRow]
    ) -> tuple[list[float], list[float]]:
        def holding(batch: list[int] | None) -> None:
            on_batch(None if batch is None else ratings_of(rows[index] for index in batch))

        mine = completion_logprobs(candidate, tokenizer, items, budget, holding)
        with as_active() as model:
            theirs = completion_logprobs(model, tokenizer, items, budget, holding)
        return mine, theirs

    gains: list[tuple[float, int]] = []
    if heldout_kto:
        mine, theirs = score([(row.prompt, row.completion) for row in heldout_kto], heldout_kto)
        deltas = [m - t for m, t in zip(mine, theirs, strict=True)]
        good = [d for d, row in zip(deltas, heldout_kto, strict=True) if row.label]
        bad = [d for d, row in zip(deltas, heldout_kto, strict=True) if not row.label]
        kto_gain = (mean(good) if good else 0.0) - (mean(bad) if bad else 0.0)
        metrics["heldout_kto"] = len(heldout_kto)
        metrics["kto_gain"] = kto_gain
        gains.append((kto_gain, len(heldout_kto)))
    if heldout_pairs:
        chosen_mine, chosen_theirs = score(
            [(p.prompt, p.chosen) for p in heldout_pairs], heldout_pairs
        )
        rejected_mine, rejected_theirs = score(
            [(p.prompt, p.rejected) for p in heldout_pairs], heldout_pairs
        )
        margin_mine = [c - r for c, r in zip(chosen_mine, rejected_mine, strict=True)]
        margin_theirs = [c - r for c, r in zip(chosen_theirs, rejected_theirs, strict=True)]
        metrics["heldout_pairs"] = len(heldout_pairs)
        metrics["pair_accuracy_candidate"] = mean([float(m > 0) for m in margin_mine])
        metrics["pair_accuracy_active"] = mean([float(m > 0) for m in margin_theirs])
        pair_gain = mean([m - t for m, t in zip(margin_mine, margin_theirs, strict=True)])
        metrics["pair_gain"] = pair_gain
        gains.append((pair_gain, len(heldout_pairs)))
    if gains:
        metrics["preference_gain"] = sum(g * n for g, n in gains) / sum(n for _, n in gains)

    prompts = [render_message(tokenizer, p) for p in FIXED_PROMPTS]
    new = greedy_answers(candidate, tokenizer, prompts, config.max_new_tokens, config.batch_size)
    with as_active() as model:
        old = greedy_answers(model, tokenizer, prompts, config.max_new_tokens, config.batch_size)
    metrics["kl_to_base"] = kl_to_base(candidate, tokenizer, prompts, new, budget.chunk_tokens)
    metrics["repetition"] = repetition(new)
    metrics["repetition_active"] = repetition(old)
    metrics["empty_fraction"] = mean([float(not tokenizer.decode(a).strip()) for a in new])
    metrics["empty_fraction_active"] = mean([float(not tokenizer.decode(a).strip()) for a in old])
    length_new, length_old = mean([len(a) for a in new]), mean([len(a) for a in old])
    ratio = length_new / length_old if length_old else (1.0 if not length_new else float("inf"))
    metrics["length_ratio"] = ratio
    reasons = judge(metrics, config)
    return GateResult(passed=not reasons, reasons=reasons, metrics=metrics)


def judge(metrics: dict[str, Any], config: GateConfig) -> list[str]:
    """Why the gate's numbers reject the candidate, in the order checked (none: it passes)."""
    reasons: list[str] = []
    gain = metrics.get("preference_gain")
    if gain is None:
        reasons.append("no held-out feedback to evaluate the candidate on")
    elif gain <= config.min_preference_gain:
        reasons.append(
            f"held-out preference gain {gain:.4f} is not above {config.min_preference_gain}: "
            "the candidate does not prefer what raters preferred more than the active version"
        )
    kl = metrics["kl_to_base"]
    if kl > config.max_kl:
        reasons.append(f"KL to the base model {kl:.4f} exceeds {config.max_kl}")
    # Relative to the active version too: a model that already repeats is not blamed for it.
    if metrics["repetition"] > max(config.max_repetition, metrics["repetition_active"] + 0.1):
        reasons.append(f"repeated text: {metrics['repetition']:.2f} of 4-grams repeat")
    empty = metrics["empty_fraction"]
    if empty > max(config.max_empty_fraction, metrics["empty_fraction_active"]):
        reasons.append(f"empty answers: {empty:.2f} of the fixed prompts")
    ratio = metrics["length_ratio"]
    if not config.min_length_ratio <= ratio <= config.max_length_ratio:
        reasons.append(f"answer length drifted: {ratio:.2f} times the active version's")
    return reasons


def render_message(tokenizer: Any, message: str) -> str:
    """One user message in the model's chat template, ready for the assistant's answer."""
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    )


def mean(values: Sequence[float]) -> float:
    """The mean of `values`, 0 for none."""
    return sum(values) / len(values) if values else 0.0
