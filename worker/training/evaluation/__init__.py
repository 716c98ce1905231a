"""Automatic evaluation of a version: its answers to references scored with chrF and ROUGE-L, and
its degeneration measured on open prompts, from the data written for this project beside this
module (`references.jsonl`, `prompts.jsonl`; see README.md there)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from app.models import Task
from app.rewards import (
    NoOptions,
    RepetitionOptions,
    RewardContext,
    Sample,
    chrf,
    no_repetition,
    rouge_l,
    words,
)
from app.services.prompts import user_message
from app.training_config import GateConfig, TokenBudget
from worker.training.gate import completion_logprobs, greedy_answers, mean, render_message

SUITE_DIR = Path(__file__).parent

EXAMPLES = 4
"""Answers to open prompts kept with an evaluation, for people to read beside the figures."""


@dataclass(frozen=True)
class Suite:
    """The evaluation data: references (translations and QA with context) and open prompts."""

    references: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    digest: str
    """Short sha256 of the files: evaluations compare only within one digest."""


def load_suite(directory: Path = SUITE_DIR) -> Suite:
    """Read the evaluation data from `directory`."""
    files = [directory / "references.jsonl", directory / "prompts.jsonl"]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    references, prompts = (
        [json.loads(line) for line in f.read_text().splitlines() if line.strip()] for f in files
    )
    return Suite(references=references, prompts=prompts, digest=digest)


@dataclass
class Evaluation:
    """A version's figures on one suite, and a few of its answers."""

    digest: str
    metrics: dict[str, float]
    examples: list[dict[str, str]] = field(default_factory=list)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    *,
    suite: Suite,
    config: GateConfig,
    budget: TokenBudget,
    as_base: Callable[[], AbstractContextManager[Any]],
) -> Evaluation:
    """Greedy answers of `model` to the suite (the gate's `max_new_tokens` and `batch_size`),
    scored against the references and measured for degeneration; `as_base` gives the base model,
    whose perplexity of the open answers says whether they are still language."""
    messages = [user_message(Task(item["task"]), item["input"]) for item in suite.references]
    messages += [item["prompt"] for item in suite.prompts]
    rendered = [render_message(tokenizer, message) for message in messages]
    answers = [
        tokenizer.decode(ids, skip_special_tokens=True).strip()
        for ids in greedy_answers(
            model, tokenizer, rendered, config.max_new_tokens, config.batch_size
        )
    ]
    split = len(suite.references)
    references = [
        Sample(prompt=m, answer=a, task=item["task"], reference=item["reference"])
        for m, a, item in zip(messages[:split], answers[:split], suite.references, strict=True)
    ]
    opens = answers[split:]
    metrics: dict[str, float] = {}
    for task, name, reward in (("translate", "chrf", chrf), ("qa", "rouge_l", rouge_l)):
        of_task = [sample for sample in references if sample.task == task]
        scores = reward(of_task, NoOptions(), RewardContext())
        metrics[name] = mean([s for s in scores if s is not None])
    metrics["reference_score"] = (metrics["chrf"] + metrics["rouge_l"]) / 2
    open_samples = [
        Sample(prompt=m, answer=a) for m, a in zip(messages[split:], opens, strict=True)
    ]
    fresh = no_repetition(open_samples, RepetitionOptions(n=3), RewardContext())
    metrics["repetition"] = 1 - mean([f for f in fresh if f is not None])
    metrics["distinct_2"] = distinct_ngrams(opens, 2)
    metrics["mean_words"] = mean([len(a.split()) for a in opens])
    metrics["empty_fraction"] = mean([float(not a) for a in opens])
    metrics["opening_diversity"] = opening_diversity(opens)
    with as_base() as base:
        logprobs = completion_logprobs(
            base, tokenizer, [(r, a) for r, a in zip(rendered[split:], opens, strict=True)], budget
        )
    metrics["base_perplexity"] = math.exp(-mean(logprobs))
    examples = [
        {"prompt": item["prompt"], "answer": answer}
        for item, answer in zip(suite.prompts[:EXAMPLES], opens, strict=False)
    ]
    return Evaluation(digest=suite.digest, metrics=metrics, examples=examples)


def degeneration(
    candidate: dict[str, float], references: dict[str, dict[str, float]], config: GateConfig
) -> list[str]:
    """Which bounds the candidate's evaluation breaks relative to each reference version's (by
    name: the base's and the active's), each reason naming the bound (none: it passes)."""
    reasons: list[str] = []
    for name, reference in references.items():
        repetition = (
            reference["repetition"] * config.max_repetition_growth + config.repetition_slack
        )
        if candidate["repetition"] > repetition:
            reasons.append(
                f"repetition: {candidate['repetition']:.3f} of word trigrams repeat, above "
                f"{repetition:.3f} ({config.max_repetition_growth}x {name}'s "
                f"{reference['repetition']:.3f} + {config.repetition_slack})"
            )
        distinct = reference["distinct_2"] * config.min_distinct_ratio
        if candidate["distinct_2"] < distinct:
            reasons.append(
                f"distinct word pairs: {candidate['distinct_2']:.3f}, below {distinct:.3f} "
                f"({config.min_distinct_ratio}x {name}'s {reference['distinct_2']:.3f})"
            )
        words = reference["mean_words"]
        if words >= 1 and abs(candidate["mean_words"] / words - 1) > config.max_length_change:
            reasons.append(
                f"length: {candidate['mean_words']:.1f} words an answer, more than "
                f"{config.max_length_change:.0%} from {name}'s {words:.1f}"
            )
        openings = reference["opening_diversity"] * config.min_opening_ratio
        if candidate["opening_diversity"] < openings:
            reasons.append(
                f"format collapse: opening variety {candidate['opening_diversity']:.2f}, below "
                f"{openings:.2f} ({config.min_opening_ratio}x {name}'s "
                f"{reference['opening_diversity']:.2f})"
            )
        perplexity = reference["base_perplexity"] * config.max_perplexity_growth
        if candidate["base_perplexity"] > perplexity:
            reasons.append(
                f"base perplexity: {candidate['base_perplexity']:.1f}, above {perplexity:.1f} "
                f"({config.max_perplexity_growth}x {name}'s {reference['base_perplexity']:.1f})"
            )
        floor = reference["reference_score"] - config.max_reference_drop
        if candidate["reference_score"] < floor:
            reasons.append(
                f"references: chrF/ROUGE-L {candidate['reference_score']:.3f}, below {floor:.3f} "
                f"({name}'s {reference['reference_score']:.3f} - {config.max_reference_drop})"
            )
    return reasons


def distinct_ngrams(answers: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all answers, as a share of all their n-grams (1: no repeats)."""
    grams = [
        tuple(words[i : i + n]) for words in map(words, answers) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def opening_diversity(answers: Sequence[str]) -> float:
    """Distinct openings (first three words, and whether the answer is a list) per answer: low
    when answers collapse into one format."""
    openings = {(tuple(words(a)[:3]), bool(regex.match(r"\s*([-*•]|\d+[.)])", a))) for a in answers}
    return len(openings) / len(answers) if answers else 0.0
