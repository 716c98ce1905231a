"""Programmatic rewards on hand-made cases, their mix, and the validation of a mix."""

from __future__ import annotations

import time

import pytest

from app.rewards import (
    REWARDS,
    InvalidRewards,
    RewardContext,
    RewardUnavailable,
    Sample,
    combine,
    parse_specs,
)


def score(name: str, samples: list[Sample], **options: object) -> list[float | None]:
    """One reward alone, with these options."""
    [spec] = parse_specs({name: {"weight": 1, **options}})
    return REWARDS[name][0](samples, spec.options, RewardContext())


def answer(text: str, reference: str | None = None, task: str = "generate") -> Sample:
    return Sample(prompt="Say something.", answer=text, task=task, reference=reference)


def test_length_target_peaks_at_the_target_and_falls_on_both_sides() -> None:
    words = [answer(" ".join(["word"] * n)) for n in (10, 5, 15, 0, 20, 40)]
    assert score("length_target", words, target=10) == [1.0, 0.5, 0.5, 0.0, 0.0, 0.0]
    chars = score("length_target", [answer("abcd"), answer("ab")], target=4, unit="chars")
    assert chars == [1.0, 0.5]


def test_format_match_checks_a_pattern_only_on_the_tasks_it_names() -> None:
    samples = [
        answer("Answer: 42", task="qa"),
        answer("I think it is 42", task="qa"),
        answer("Answer: 42", task="translate"),
    ]
    assert score("format_match", samples, pattern=r"^Answer: \d+$", tasks=["qa"]) == [1, 0, None]
    assert score("format_match", samples, pattern=r"\b42\b") == [1, 1, 1]


def test_a_pattern_that_backtracks_for_ever_scores_zero_quickly() -> None:
    started = time.monotonic()
    assert score("format_match", [answer("x" * 5000 + "!")], pattern=r"(x+x+)+y") == [0.0]
    assert time.monotonic() - started < 2


def test_no_repetition_is_one_minus_the_repeated_word_trigram_share() -> None:
    fresh = answer("the cat sat on the mat")
    looping = answer("blorp blorp blorp blorp blorp blorp")  # 4 trigrams, 3 repeat the first
    assert score("no_repetition", [fresh, looping, answer("hi")]) == [1.0, 0.25, 1.0]


def test_reference_scores_rank_closer_answers_higher_and_skip_rows_without_one() -> None:
    reference = "Le chat est assis sur le tapis."
    exact, close, far = (
        answer("Le chat est assis sur le tapis.", reference),
        answer("Le chat est sur le tapis.", reference),
        answer("Bonjour tout le monde.", reference),
    )
    for name in ("chrf", "bleu", "rouge_l"):
        scores = score(name, [exact, close, far, answer("anything")])
        assert scores[3] is None, name
        high, middle, low = (float(s or 0) for s in scores[:3])
        assert high == pytest.approx(1.0) and 0 < low < middle < high, (name, scores)


def test_rouge_counts_words_of_any_script() -> None:
    """rouge-score's own tokenizer drops every non-ASCII letter: a Russian answer would score 0
    against itself."""
    same = answer("Столица Франции — Париж.", "Столица Франции — Париж.")
    other = answer("Берлин.", "Столица Франции — Париж.")
    assert score("rouge_l", [same, other]) == [pytest.approx(1.0), 0.0]


def test_the_reward_model_s_scores_are_squashed_to_between_zero_and_one() -> None:
    [spec] = parse_specs({"reward_model": 1})
    seen: list[tuple[list[str], list[str]]] = []

    def model_scores(prompts: object, answers: object) -> list[float]:
        seen.append((list(prompts), list(answers)))  # type: ignore[call-overload]
        return [0.0, 3.0, -1e6]

    samples = [answer("a"), answer("b"), answer("c")]
    scores = REWARDS["reward_model"][0](samples, spec.options, RewardContext(model_scores))
    assert scores[0] == 0.5 and 0.95 < (scores[1] or 0) < 1 and scores[2] == pytest.approx(0)
    assert seen == [(["Say something."] * 3, ["a", "b", "c"])]
    with pytest.raises(RewardUnavailable, match="none has been trained"):
        combine(samples, [spec])


def test_a_mix_is_the_weighted_mean_of_the_rewards_that_apply() -> None:
    specs = parse_specs({"no_repetition": 3, "chrf": {"weight": 1}})
    with_reference = answer("the cat", "the cat")  # both apply: (3 * 1 + 1 * 1) / 4
    without = answer("blorp blorp blorp blorp")  # only no_repetition: 2 trigrams, 1 repeats
    assert combine([with_reference, without], specs) == [pytest.approx(1.0), 0.5]
    assert combine([answer("x")], parse_specs({"chrf": 1})) == [None]


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ({}, "rewards must be a non-empty object"),
        ({"vibes": 1}, "unknown reward 'vibes'; known: bleu, chrf"),
        ({"chrf": 0}, "chrf: weight must be above 0"),
        ({"chrf": True}, "chrf: weight must be a number"),
        ({"chrf": float("nan")}, "chrf: weight must be above 0"),
        ({"chrf": {"weight": 1, "target": 3}}, "chrf: target: Unexpected keyword argument"),
        ({"length_target": {"target": 0}}, "length_target: target: Input should be greater"),
        ({"format_match": {"pattern": "(unclosed"}}, "format_match: pattern: Value error, not a"),
        ({"format_match": {}}, "format_match: pattern: Field required"),
        ({"format_match": {"pattern": "x", "tasks": ["poem"]}}, "format_match: tasks.0: Input"),
    ],
)
def test_a_bad_mix_says_what_is_wrong(mix: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRewards) as raised:
        parse_specs(mix)
    assert str(raised.value).startswith(message), str(raised.value)


def test_every_registered_reward_has_validating_options_and_a_docstring() -> None:
    """Adding a reward is a function and a registry line: both must be usable as they are."""
    for name, (function, options) in REWARDS.items():
        assert function.__doc__, name
        try:
            parse_specs({name: 1})
        except InvalidRewards as exc:  # only a required option may be missing
            assert "Field required" in str(exc), (name, exc)
        assert options.__doc__, name
