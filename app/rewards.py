"""Programmatic rewards: named functions that score answers, combined with weights.

A reward sees a batch of `Sample`s and gives each a score in [0, 1], or None where it does not
apply (a reference-based score with no reference). `combine` mixes several by weight over the
ones that apply. Which rewards a round uses, and how much each counts, comes from the settings
(RL_REWARDS) or a round's body, as `{"name": weight}` or `{"name": {"weight": w, ...options}}`;
`parse_specs` validates that before a round is queued.

Adding a reward: write a function `(samples, options, context) -> list[float | None]`, give it
an options class (a pydantic dataclass; `NoOptions` if it has none), and register both in
`REWARDS` with one line.

No torch here: the API validates specs with this module; the reward model's scores reach it
through `RewardContext.model_scores`, which the worker fills.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Literal

import regex
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass as options_dataclass

Task = Literal["generate", "translate", "qa", "chat"]

_STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Sample:
    """One answer to score: the input as its user gave it, the answer, and what else is known."""

    prompt: str
    answer: str
    task: str = "generate"
    reference: str | None = None
    """A known good answer (a rater's correction, or a reference set's), where there is one."""


@dataclass
class RewardContext:
    """What rewards may need beyond the samples: the reward model's scorer, when there is one."""

    model_scores: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None
    """(prompts, answers) -> the reward model's raw scores (logits), one per answer."""


class RewardUnavailable(RuntimeError):
    """A configured reward cannot be computed here (no reward model trained yet)."""


@options_dataclass(frozen=True, config=_STRICT)
class NoOptions:
    """A reward without options."""


@options_dataclass(frozen=True, config=_STRICT)
class LengthOptions:
    """Options of `length_target`."""

    target: Annotated[int, Field(ge=1, le=100_000)] = 64
    """The length an answer should have."""
    unit: Literal["words", "chars"] = "words"
    """What the length counts."""


@options_dataclass(frozen=True, config=_STRICT)
class RegexOptions:
    """Options of `format_match`."""

    pattern: Annotated[str, Field(min_length=1, max_length=500)]
    """A regular expression (the `regex` module's syntax) the answer should match somewhere."""
    tasks: tuple[Task, ...] = ()
    """Tasks it applies to; empty: all."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            regex.compile(pattern)
        except regex.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return pattern


@options_dataclass(frozen=True, config=_STRICT)
class RepetitionOptions:
    """Options of `no_repetition`."""

    n: Annotated[int, Field(ge=1, le=8)] = 3
    """Length of the word n-grams counted."""


REGEX_TIMEOUT = 0.05
"""Seconds one pattern may take on one answer: a pattern that backtracks badly scores 0."""


def length_target(
    samples: Sequence[Sample], options: LengthOptions, context: RewardContext
) -> list[float | None]:
    """1 at the target length, falling linearly to 0 at no length or twice the target."""
    scores: list[float | None] = []
    for sample in samples:
        size = len(sample.answer.split()) if options.unit == "words" else len(sample.answer)
        scores.append(max(0.0, 1.0 - abs(size - options.target) / options.target))
    return scores


def format_match(
    samples: Sequence[Sample], options: RegexOptions, context: RewardContext
) -> list[float | None]:
    """1 if the answer matches the pattern, else 0; None for tasks it does not apply to."""
    pattern = regex.compile(options.pattern)
    scores: list[float | None] = []
    for sample in samples:
        if options.tasks and sample.task not in options.tasks:
            scores.append(None)
            continue
        try:
            found = pattern.search(sample.answer, timeout=REGEX_TIMEOUT) is not None
        except TimeoutError:
            found = False
        scores.append(1.0 if found else 0.0)
    return scores


def no_repetition(
    samples: Sequence[Sample], options: RepetitionOptions, context: RewardContext
) -> list[float | None]:
    """1 minus the share of the answer's word n-grams that repeat an earlier one."""
    scores: list[float | None] = []
    for sample in samples:
        tokens = words(sample.answer)
        grams = [tuple(tokens[i : i + options.n]) for i in range(len(tokens) - options.n + 1)]
        scores.append(1.0 - (len(grams) - len(set(grams))) / len(grams) if grams else 1.0)
    return scores


def chrf(
    samples: Sequence[Sample], options: NoOptions, context: RewardContext
) -> list[float | None]:
    """Character n-gram F-score (sacrebleu's chrF) against the reference, in [0, 1]."""
    import sacrebleu

    return _against_reference(
        samples, lambda answer, reference: sacrebleu.sentence_chrf(answer, [reference]).score / 100
    )


def bleu(
    samples: Sequence[Sample], options: NoOptions, context: RewardContext
) -> list[float | None]:
    """Sentence BLEU (sacrebleu, with effective order for short answers) against the reference."""
    import sacrebleu

    return _against_reference(
        samples, lambda answer, reference: sacrebleu.sentence_bleu(answer, [reference]).score / 100
    )


def rouge_l(
    samples: Sequence[Sample], options: NoOptions, context: RewardContext
) -> list[float | None]:
    """ROUGE-L F-measure (rouge-score) against the reference, on words of any script."""
    scorer = _rouge_scorer()
    return _against_reference(
        samples, lambda answer, reference: scorer.score(reference, answer)["rougeL"].fmeasure
    )


def _against_reference(
    samples: Sequence[Sample], score: Callable[[str, str], float]
) -> list[float | None]:
    """`score(answer, reference)` of each sample that has a reference; None for the others."""
    return [None if s.reference is None else score(s.answer, s.reference) for s in samples]


def reward_model(
    samples: Sequence[Sample], options: NoOptions, context: RewardContext
) -> list[float | None]:
    """The reward model's score, squashed to (0, 1) by the logistic function."""
    if context.model_scores is None:
        raise RewardUnavailable("the reward model is configured, but none has been trained yet")
    raw = context.model_scores([s.prompt for s in samples], [s.answer for s in samples])
    return [sigmoid(score) for score in raw]


def sigmoid(x: float) -> float:
    """The logistic function, without overflow at either end."""
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    z = math.exp(x)
    return z / (1 + z)


RewardFunction = Callable[[Sequence[Sample], Any, RewardContext], list[float | None]]

REWARDS: dict[str, tuple[RewardFunction, type]] = {
    "length_target": (length_target, LengthOptions),
    "format_match": (format_match, RegexOptions),
    "no_repetition": (no_repetition, RepetitionOptions),
    "chrf": (chrf, NoOptions),
    "bleu": (bleu, NoOptions),
    "rouge_l": (rouge_l, NoOptions),
    "reward_model": (reward_model, NoOptions),
}
"""Every reward by name, with the class of its options."""


@dataclass(frozen=True)
class RewardSpec:
    """One reward of a mix: its name, its weight, its validated options."""

    name: str
    weight: float
    options: Any = field(default=None)


class InvalidRewards(ValueError):
    """A reward mix names an unknown reward, a bad weight or a bad option; says which."""


def parse_specs(value: Mapping[str, Any]) -> list[RewardSpec]:
    """Validate a mix, `{"name": weight}` or `{"name": {"weight": w, **options}}`."""
    if not isinstance(value, Mapping) or not value:
        raise InvalidRewards("rewards must be a non-empty object of reward names")
    specs = []
    for name, entry in value.items():
        if name not in REWARDS:
            known = ", ".join(sorted(REWARDS))
            raise InvalidRewards(f"unknown reward {name!r}; known: {known}")
        raw = dict(entry) if isinstance(entry, Mapping) else {"weight": entry}
        weight = raw.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidRewards(f"{name}: weight must be a number")
        if not (math.isfinite(weight) and 0 < weight <= 1000):
            raise InvalidRewards(f"{name}: weight must be above 0 and at most 1000")
        try:
            options: object = TypeAdapter(REWARDS[name][1]).validate_python(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidRewards(f"{name}: {problems}") from None
        specs.append(RewardSpec(name, float(weight), options))
    return specs


def combine(
    samples: Sequence[Sample], specs: Sequence[RewardSpec], context: RewardContext | None = None
) -> list[float | None]:
    """Each sample's weighted mean over the rewards that apply to it (None if none does)."""
    context = context or RewardContext()
    totals = [0.0] * len(samples)
    weights = [0.0] * len(samples)
    for spec in specs:
        function = REWARDS[spec.name][0]
        for i, score in enumerate(function(samples, spec.options, context)):
            if score is not None:
                totals[i] += spec.weight * score
                weights[i] += spec.weight
    return [
        total / weight if weight else None for total, weight in zip(totals, weights, strict=True)
    ]


def words(text: str) -> list[str]:
    """The lower-cased words of a text, in any script."""
    return regex.findall(r"\w+", text.lower())


class _WordTokenizer:
    """rouge-score's own tokenizer keeps only ASCII letters and digits: a Russian or Chinese
    answer would score 0 against its own reference."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


@cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
