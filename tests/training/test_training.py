"""Training rounds on the tiny model, called as plain functions (the worker tests use Celery)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from app.config import Settings
from app.models import Comparison, Feedback, ModelVersion, RunStatus, TrainingRun, VersionStatus
from app.services.datasets import KtoRow, PairRow
from app.services.training import request_run
from app.state import app_state
from app.training_config import TokenBudget, TrainConfig
from tests.helpers import FAST, QUICK_GATE, RATED, rate_with_corrections, reset_database, start
from worker.training import train
from worker.training.rounds import run_round
from worker.training.train import micro_batches, train_adapter, truncate_row


@pytest.fixture
def db_url(pg_url: str) -> str:
    """Rounds run on PostgreSQL here; the worker tests run them on the embedded path too."""
    reset_database(pg_url)
    return pg_url


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A small minimum, so rounds on the tiny model need only a few ratings."""
    return settings.model_copy(update={"training_min_items": 4})


def test_a_round_trains_gates_and_activates_an_adapter(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """Enough ratings: a LoRA adapter is trained, passes the gate, becomes active and is served."""
    rate_with_corrections(client, admin, RATED)
    run_id = start(sessions, {"train": FAST, "gate": QUICK_GATE})
    assert run_round(sessions, settings, run_id) is RunStatus.succeeded

    run = client.get(f"/v1/training/runs/{run_id}", headers=admin).json()
    assert run["status"] == "succeeded", run
    assert run["version"] == "v1" and run["parent_version"] == "v0"
    assert run["counts"]["train_kto"] == 8 and run["counts"]["train_pairs"] == 8
    assert run["counts"]["heldout_kto"] == 2 and run["counts"]["heldout_pairs"] == 2
    assert run["metrics"]["preference_gain"] > 0
    assert run["metrics"]["pair_accuracy_candidate"] >= run["metrics"]["pair_accuracy_active"]
    assert {"kl_to_base", "repetition", "length_ratio", "kto_loss", "dpo_loss"} <= set(
        run["metrics"]
    )
    assert [h["phase"] for h in run["history"]].count("kto") >= 1
    assert run["config"]["train"]["learning_rate"] == FAST["learning_rate"]

    # The version directory is complete and self-describing, and LoRA weights moved from zero.
    version_dir = settings.versions_dir / f"v1.run{run_id}"  # named after its round too
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["parent"] == "v0" and manifest["training_run"] == run_id
    assert set(manifest["files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }
    assert len(manifest["data"]["feedback_ids"]) == 8
    weights = load_file(version_dir / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and any(torch.count_nonzero(t) > 0 for t in lora_b)  # B starts at zero

    # Only the training part counts as used; the held-out ratings stay for later rounds.
    with sessions() as session:
        used = session.scalars(select(Feedback).where(Feedback.used_in_run_id == run_id)).all()
        assert len(used) == 8
        versions = {v.name: v.status.value for v in session.scalars(select(ModelVersion))}
    assert versions == {"v0": "retired", "v1": "active"}

    # The running app follows the new active version without a restart.
    app_state(client.app).follower.sync()
    answer = client.post(
        "/v1/generate", json={"prompt": "Hello?", "max_new_tokens": 4}, headers=admin
    )
    assert answer.json()["model_version"] == "v1"
    models = client.get("/v1/models", headers=admin).json()["data"]
    assert [(m["name"], m["status"], m["serving"]) for m in models] == [
        ("v0", "retired", False),
        ("v1", "active", True),
    ]


def test_too_little_feedback_skips_and_uses_nothing(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """Below TRAINING_MIN_ITEMS the round is skipped with the reason; no rating is marked used."""
    rate_with_corrections(client, admin, 2)
    run_id = start(sessions)
    assert run_round(sessions, settings, run_id) is RunStatus.skipped
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.live is None
        assert "minimum is 4 (TRAINING_MIN_ITEMS)" in (run.reason or "")
        assert (
            session.scalars(select(Feedback).where(Feedback.used_in_run_id.is_not(None))).all()
            == []
        )
        assert session.scalars(select(ModelVersion)).one().name == "v0"


def test_a_failing_gate_rejects_with_the_numbers(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """A candidate over the KL bound is kept as `rejected` with the reason; v0 keeps serving."""
    rate_with_corrections(client, admin, RATED)
    run_id = start(sessions, {"train": FAST, "gate": {**QUICK_GATE, "max_kl": 1e-9}})
    assert run_round(sessions, settings, run_id) is RunStatus.rejected
    run = client.get(f"/v1/training/runs/{run_id}", headers=admin).json()
    assert "KL to the base model" in run["reason"] and "exceeds 1e-09" in run["reason"]
    assert run["metrics"]["kl_to_base"] > 1e-9
    models = {m["name"]: m for m in client.get("/v1/models", headers=admin).json()["data"]}
    assert models["v1"]["status"] == "rejected" and models["v1"]["status_reason"] == run["reason"]
    assert models["v0"]["status"] == "active" and models["v0"]["serving"]


def test_one_round_at_a_time(client: TestClient, admin: dict[str, str], sessions: Any) -> None:
    """Asking while a round is live answers with that round."""
    with sessions() as session:
        first, created = request_run(session, trigger="manual")
        again, created_again = request_run(session, trigger="schedule")
    assert created and not created_again and again.id == first.id


def test_comparisons_train_too_and_rollback_by_activation(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """Comparisons count as pairs; an admin can activate the older version again (roll back)."""
    rate_with_corrections(client, admin, RATED)
    body = {"prompt": "Pick one", "max_new_tokens": 6}
    a = client.post("/v1/generate", json={**body, "seed": 1}, headers=admin).json()["id"]
    b = client.post("/v1/generate", json={**body, "seed": 2}, headers=admin).json()["id"]
    client.post(
        "/v1/comparisons", json={"generation_a": a, "generation_b": b, "winner": "b"}, headers=admin
    )
    run_id = start(sessions, {"train": FAST, "gate": QUICK_GATE})
    assert run_round(sessions, settings, run_id) is RunStatus.succeeded
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        active = session.scalars(
            select(ModelVersion).where(ModelVersion.status == VersionStatus.active)
        ).one()
        assert active.name == "v1", run.reason  # the round promoted: v1 serves
        assert run.counts["train_pairs"] + run.counts["heldout_pairs"] == RATED + 1
        comparison = session.scalars(select(Comparison)).one()
        heldout = run.counts["heldout_pairs"] > 0 and comparison.used_in_run_id is None
        assert comparison.used_in_run_id == run_id or heldout
    response = client.post("/v1/models/v0/activate", headers=admin)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "active"
    app_state(client.app).follower.sync()
    answer = client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=admin)
    assert answer.json()["model_version"] == "v0"


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_corrupt_version_is_refused_and_the_previous_keeps_serving(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings, damage: str
) -> None:
    """A version whose files fail their sha256 is refused, visibly, and serving stays on v0."""
    rate_with_corrections(client, admin, RATED)
    run_id = start(sessions, {"train": FAST, "gate": QUICK_GATE})
    run_round(sessions, settings, run_id)
    client.post("/v1/models/v0/activate", headers=admin)
    app_state(client.app).follower.sync()
    weights: Path = settings.versions_dir / f"v1.run{run_id}" / "adapter_model.safetensors"
    if damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    else:
        weights.unlink()

    # Through the API: refused with the reason.
    response = client.post("/v1/models/v1/activate", headers=admin)
    assert response.status_code == 409
    assert "adapter_model.safetensors" in response.json()["detail"]

    # Behind the API's back (as a worker would): the follower refuses it too.
    with sessions() as session:
        v0, v1 = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        v0.status, v1.status, v1.status_reason = VersionStatus.retired, VersionStatus.active, None
        session.commit()
    app_state(client.app).follower.sync()
    models = {m["name"]: m for m in client.get("/v1/models", headers=admin).json()["data"]}
    assert models["v1"]["status"] == "refused"
    assert "adapter_model.safetensors" in models["v1"]["status_reason"]
    assert models["v0"]["status"] == "active" and models["v0"]["serving"]
    answer = client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=admin)
    assert answer.status_code == 200 and answer.json()["model_version"] == "v0"


def test_training_rows_are_cut_by_the_shared_truncation_rule() -> None:
    """TRL's tokenized rows get the gate's rule: the prompt's end, then each answer's start; a
    prompt longer than max_length keeps its answer (TRL's own rule drops such a row)."""
    budget = TokenBudget(max_length=16, max_prompt_length=6, batch_tokens=32)
    prompt, long_answer = list(range(40)), list(range(100, 140))
    kto = truncate_row(
        {"prompt_ids": prompt, "completion_ids": long_answer, "KL_completion_ids": [1, 2],
         "label": True},
        budget,
    )  # fmt: skip
    assert kto == {
        "prompt_ids": prompt[-6:], "completion_ids": long_answer[:10], "KL_completion_ids": [1, 2],
        "label": True,
    }  # fmt: skip
    dpo = truncate_row(
        {"prompt_ids": [1, 2], "chosen_ids": long_answer, "rejected_ids": [9]}, budget
    )
    assert dpo == {"prompt_ids": [1, 2], "chosen_ids": long_answer[:14], "rejected_ids": [9]}
    for key in ("completion_ids", "chosen_ids"):
        row = {"prompt_ids": prompt, key: long_answer}
        assert truncate_row(row, budget)[key] == budget.truncate(prompt, long_answer)[1]


def test_training_micro_batches_stay_within_the_token_budget() -> None:
    """A micro-batch holds at most batch_tokens tokens computed with gradients: a DPO row is
    two sequences (chosen and rejected), a KTO row one (its KL term runs without), and KTO
    takes two rows at least; gradients accumulate to batch_size. Found by bench/abuse.py: a
    DPO pair counted as one sequence, and the default micro-batch of 8 pairs held 8,192 tokens
    with gradients: the worker was killed for memory at 21 GiB on 20 maximal QA ratings."""
    config = TrainConfig(batch_size=8)
    assert micro_batches(config, TokenBudget(), sequences=2) == (1, 8)
    assert micro_batches(config, TokenBudget(), sequences=1, least=2) == (2, 4)
    budget = TokenBudget(max_length=512, max_prompt_length=256, batch_tokens=2048)
    assert micro_batches(config, budget, sequences=2) == (2, 4)
    assert micro_batches(TrainConfig(batch_size=5), budget, sequences=2) == (2, 3)
    assert micro_batches(config, budget, sequences=1, least=2) == (4, 2)


def long_rows(count: int) -> tuple[list[KtoRow], list[PairRow]]:
    """Maximal ratings: prompts and answers many times the budget's length."""
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    prompt = " ".join(f"context{j}" for j in range(200)) + " Question?"
    answer = " ".join(f"answer{j}" for j in range(200))
    kto = [KtoRow(f"{i} {prompt}", answer, i % 2 == 0, i, i, 1, now) for i in range(count)]
    pairs = [
        PairRow(f"{i} {prompt}", answer, "No. " + answer, "correction", i, 1, now)
        for i in range(count)
    ]
    return kto, pairs


def test_a_round_over_maximal_ratings_trains_within_the_budget(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KTO and DPO on rows far over the budget: every forward pass of the policy and the
    reference holds at most max_length tokens a sequence and batch_tokens in all, DPO's chosen
    and rejected together (they held twice that, found by bench/abuse.py), in micro-batches
    that accumulate to one optimiser step."""
    from transformers import AutoTokenizer

    budget = TokenBudget(max_length=64, max_prompt_length=32, batch_tokens=128)
    shapes: list[tuple[int, int]] = []
    load_base = train.load_base

    def recording(path: Path) -> Any:
        model = load_base(path)
        model.get_decoder().register_forward_pre_hook(
            lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
            with_kwargs=True,
        )
        return model

    monkeypatch.setattr(train, "load_base", recording)
    kto, pairs = long_rows(4)
    config = TrainConfig(batch_size=4, epochs=1, learning_rate=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    steps: list[int] = []
    result = train_adapter(
        tiny_model_dir, None, kto, pairs, config, tokenizer, steps.append, budget
    )
    assert shapes and max(width for _, width in shapes) == budget.max_length
    assert all(rows * width <= budget.batch_tokens for rows, width in shapes), shapes
    assert steps == [1, 1]  # one optimiser step per phase, over 4 rows
    assert {"kto_loss", "dpo_loss"} <= set(result.metrics)
