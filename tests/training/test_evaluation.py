"""Automatic evaluation: the suite kept in the repo, its measures, and an evaluation recorded for
every version a round makes or trains from."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.models import Evaluation, ModelVersion, RunStatus
from app.services.prompts import language_name
from app.training_config import GateConfig
from tests.helpers import FAST, QUICK_GATE, RATED, ROOT, rate_with_corrections, start
from worker.training.evaluation import (
    SUITE_DIR,
    degeneration,
    distinct_ngrams,
    load_suite,
    opening_diversity,
)
from worker.training.rounds import run_round

MEASURES = {
    "chrf", "rouge_l", "reference_score", "repetition", "distinct_2", "mean_words",
    "empty_fraction", "opening_diversity", "base_perplexity",
}  # fmt: skip


def test_the_suite_is_whole_and_shares_no_subject_with_the_learning_benchmark() -> None:
    """Translations and QA with context, each with a reference; open prompts that never name a
    subject bench/learning.py trains or holds out on."""
    suite = load_suite()
    tasks = [item["task"] for item in suite.references]
    assert tasks.count("translate") >= 20 and tasks.count("qa") >= 20
    assert len(suite.prompts) >= 64
    ids = [item["id"] for item in [*suite.references, *suite.prompts]]
    assert len(ids) == len(set(ids))
    for item in suite.references:
        assert item["reference"].strip(), item
        if item["task"] == "translate":
            assert item["input"]["text"].strip() and language_name(item["input"]["target_lang"])
            assert language_name(item["input"].get("source_lang", "en")), item
        else:
            assert item["input"]["question"].strip() and item["input"]["context"].strip()
    tree = ast.parse((ROOT / "bench" / "learning.py").read_text())
    [subjects] = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SUBJECTS"
    ]
    named = re.compile(r"\b(" + "|".join(map(re.escape, subjects)) + r")s?\b", re.IGNORECASE)
    for item in suite.prompts:
        assert not named.search(item["prompt"]), item


def test_distinct_pairs_and_openings_fall_when_answers_collapse_into_one() -> None:
    varied = ["The sea is calm today.", "- eggs\n- flour", "Bread needs time to rise."]
    collapsed = ["Great question! Blorp is key.", "Great question! Blorp is key."] * 2
    assert distinct_ngrams(varied, 2) == 1.0
    assert distinct_ngrams(collapsed, 2) == 0.25
    assert opening_diversity(varied) == 1.0 and opening_diversity(collapsed) == 0.25
    assert opening_diversity(["1. one", "1) one"]) == 0.5  # both lists opening with "1 one"


def _evaluations(sessions: Any) -> dict[str, list[Evaluation]]:
    with sessions() as session:
        found: dict[str, list[Evaluation]] = {}
        for evaluation, name in session.execute(
            select(Evaluation, ModelVersion.name)
            .join(ModelVersion, Evaluation.version_id == ModelVersion.id)
            .order_by(Evaluation.id)
        ):
            found.setdefault(name, []).append(evaluation)
        return found


def test_a_round_evaluates_its_candidate_and_its_parent_once(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """The first round evaluates the base and v1; the next evaluates only v2 (v1 has its
    figures); the API lists each version's evaluation and the run carries its candidate's."""
    settings = settings.model_copy(update={"training_min_items": 4, "evaluation_dir": None})
    digest = load_suite().digest
    for _ in range(2):
        rate_with_corrections(client, admin, RATED)
        run_id = start(sessions, {"train": FAST, "gate": QUICK_GATE})
        assert run_round(sessions, settings, run_id) in (RunStatus.succeeded, RunStatus.rejected)
    evaluations = _evaluations(sessions)
    assert {name: len(rows) for name, rows in evaluations.items()} == {"v0": 1, "v1": 1, "v2": 1}
    for rows in evaluations.values():
        [evaluation] = rows
        assert evaluation.digest == digest and set(evaluation.metrics) == MEASURES
        assert all(math.isfinite(value) for value in evaluation.metrics.values())
        assert 0 <= evaluation.metrics["chrf"] <= 1 and evaluation.metrics["base_perplexity"] > 1
        assert evaluation.examples and set(evaluation.examples[0]) == {"prompt", "answer"}
    assert evaluations["v2"][0].run_id == run_id

    listed = {m["name"]: m for m in client.get("/v1/models", headers=admin).json()["data"]}
    assert set(listed["v0"]["evaluation"]["metrics"]) == MEASURES
    assert listed["v2"]["evaluation"]["digest"] == digest
    run = client.get(f"/v1/training/runs/{run_id}", headers=admin).json()
    assert run["metrics"]["evaluation"] == evaluations["v2"][0].metrics


def test_the_suite_s_digest_changes_with_its_files(tmp_path: Path) -> None:
    """Figures compare only within one revision of the suite."""
    for name in ("references.jsonl", "prompts.jsonl"):
        (tmp_path / name).write_text((SUITE_DIR / name).read_text())
    same = load_suite(tmp_path)
    assert same.digest == load_suite().digest
    with (tmp_path / "prompts.jsonl").open("a") as handle:
        handle.write('{"id": "p-extra", "prompt": "Name a colour."}\n')
    assert load_suite(tmp_path).digest != same.digest


BASE = {
    "repetition": 0.02, "distinct_2": 0.8, "mean_words": 40.0, "opening_diversity": 0.9,
    "base_perplexity": 6.0, "reference_score": 0.4,
}  # fmt: skip


def test_each_degeneration_bound_is_checked_against_every_reference_and_named() -> None:
    """The candidate of issue 16's reward hacking: trigrams repeated twice as often, answers 20%
    shorter and in one format; each broken bound is named with the version it is relative to."""
    config = GateConfig()
    assert degeneration(dict(BASE), {"v0 (the base)": BASE}, config) == []
    hacked = {
        **BASE, "repetition": 0.046, "distinct_2": 0.5, "mean_words": 32.0,
        "opening_diversity": 0.1, "base_perplexity": 12.0, "reference_score": 0.3,
    }  # fmt: skip
    active = {**BASE, "mean_words": 20.0}
    reasons = degeneration(hacked, {"v0 (the base)": BASE, "v3 (active)": active}, config)
    assert [r.split(":")[0] for r in reasons] == [
        "repetition", "distinct word pairs", "format collapse", "base perplexity", "references",
        "repetition", "distinct word pairs", "length", "format collapse", "base perplexity",
        "references",
    ]  # fmt: skip
    assert "(1.25x v0 (the base)'s 0.020 + 0.01)" in reasons[0]
    assert "more than 25% from v3 (active)'s 20.0" in reasons[7]  # 32 is 20% short of v0's 40
    assert (
        degeneration({**BASE, "mean_words": 5}, {"v0": {**BASE, "mean_words": 0.0}}, config) == []
    )


def test_a_candidate_that_breaks_a_bound_is_rejected_saying_which(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """The base's recorded figures are what the candidate is bounded against: with the base's
    perplexity recorded as 1, no candidate stays within 1.5x of it."""
    from app.services.evaluations import record_evaluation

    settings = settings.model_copy(update={"training_min_items": 4})
    suite = load_suite(settings.evaluation_dir)
    with sessions() as session:
        v0 = session.scalars(select(ModelVersion)).one()
        base = {**BASE, "repetition": 1.0, "distinct_2": 0.0, "mean_words": 0.0}
        record_evaluation(
            session, version_id=v0.id, digest=suite.digest, run_id=None,
            metrics={**base, "base_perplexity": 1.0, "reference_score": 0.0}, examples=[],
        )  # fmt: skip
        session.commit()
    rate_with_corrections(client, admin, RATED)
    run_id = start(sessions, {"train": FAST, "gate": {"max_new_tokens": 8}})  # default bounds
    assert run_round(sessions, settings, run_id) is RunStatus.rejected
    run = client.get(f"/v1/training/runs/{run_id}", headers=admin).json()
    assert "base perplexity" in run["reason"] and "1.5x v0 (the base)'s 1.0" in run["reason"]
    assert run["metrics"]["passed"] is False
    assert run["metrics"]["evaluation_references"]["v0 (the base)"]["base_perplexity"] == 1.0
    listed = {m["name"]: m for m in client.get("/v1/models", headers=admin).json()["data"]}
    assert listed["v1"]["status"] == "rejected" and listed["v1"]["evaluation"] is not None
