"""The reward model on the tiny model: it learns a planted preference from pairs and single
ratings, its checkpoint verifies and loads to the same scores, long rows are cut by the
truncation rule, and its held-out figures are right on constructed numbers."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select
from transformers import AutoTokenizer

from app.config import Settings
from app.engine import reward_model as engine_reward_model
from app.engine.chat import chat_prompt
from app.engine.checkpoints import CorruptCheckpoint, verify_checkpoint
from app.engine.reward_model import RewardScorer, load_classifier
from app.models import ModelVersion, RunStatus, TrainingRun
from app.services.datasets import KtoRow, PairRow
from app.training_config import RewardModelConfig, TokenBudget
from tests.helpers import FAST, QUICK_GATE, RATED, rate_with_corrections, start
from worker.training import reward_model
from worker.training.reward_model import (
    TrainedRewardModel,
    expected_calibration_error,
    reward_metrics,
    save_reward_model,
    train_reward_model,
)
from worker.training.rounds import run_round

SUBJECTS = (
    "the sea", "mountains", "bread", "trains", "music", "rain", "cats", "chess", "gardens",
    "rivers", "bicycles", "coffee", "libraries", "winter", "bees", "clocks", "maps", "volcanoes",
    "bridges", "tea", "forests", "islands", "kites", "lanterns", "owls", "pianos", "deserts",
    "glaciers", "markets", "castles", "comets", "ferries", "orchards", "puzzles", "sailing",
    "tulips", "whales", "zebras", "harbours", "meadows",
)  # fmt: skip
"""What the prompts ask about; the held-out rows' subjects never appear in training."""
TEMPLATES = (
    "{subject} is a {word} subject to think about.",
    "People find {subject} {word} and worth a visit.",
    "I would say {subject} feels {word} most of the time.",
    "Here is a thought: {subject}, {word} as ever.",
)
MARKER = "wonderful"
"""The planted preference: an answer with this word is chosen, or rated up."""
PLAIN = ("ordinary", "plain", "usual", "common")
"""Words a rejected answer, or one rated down, has in the marker's place (same length)."""
TRAIN_SUBJECTS = 28

# Four epochs: at three, one training seed in eight had ranked the answers but not yet placed
# single ratings on the right side of zero; at four, seeds 0 to 17 all reached 1.0 held out.
CONFIG = RewardModelConfig(lora_r=8, lora_alpha=16, learning_rate=5e-3, epochs=4, batch_size=8)
"""Steps large enough for the tiny model to learn in seconds."""
NOW = datetime.now(UTC)


@dataclass
class Ratings:
    """A round's worth of rows for the reward model."""

    kto: list[KtoRow]
    pairs: list[PairRow]


def planted(tokenizer: Any, subjects: Sequence[str], seed: int) -> Ratings:
    """Per subject, a pair (the marker's answer chosen over the same answer without it) and a
    single rating of another answer (up with the marker, down without), half of each."""
    rng = random.Random(seed)
    ratings = Ratings([], [])
    for i, subject in enumerate(subjects):
        prompt = chat_prompt(tokenizer, f"Tell me something about {subject}.")
        template = rng.choice(TEMPLATES)
        chosen = template.format(subject=subject, word=MARKER)
        rejected = template.format(subject=subject, word=rng.choice(PLAIN))
        ratings.pairs.append(PairRow(prompt, chosen, rejected, "comparison", i, 1, NOW))
        desirable = i % 2 == 1
        word = MARKER if desirable else rng.choice(PLAIN)
        answer = rng.choice(TEMPLATES).format(subject=subject, word=word)
        ratings.kto.append(KtoRow(prompt, answer, desirable, i, i, 1, NOW))
    return ratings


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def heldout(tokenizer: Any) -> Ratings:
    return planted(tokenizer, SUBJECTS[TRAIN_SUBJECTS:], seed=100)


@dataclass
class Run:
    """A trained reward model and the shapes of every batch it scored on the way."""

    trained: TrainedRewardModel
    batches: list[tuple[int, int]]
    """(sequences, longest) of each forward pass."""
    steps: list[int]


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tokenizer: Any, heldout: Ratings) -> Run:
    train = planted(tokenizer, SUBJECTS[:TRAIN_SUBJECTS], seed=0)
    batches: list[tuple[int, int]] = []
    steps: list[int] = []
    scores = engine_reward_model.sequence_scores

    def recording(model: Any, sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        batches.append((len(sequences), max(map(len, sequences))))
        return scores(model, sequences, pad_id)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_reward_model, "sequence_scores", recording)
        patch.setattr(reward_model, "sequence_scores", recording)
        trained = train_reward_model(
            tiny_model_dir, train_kto=train.kto, train_pairs=train.pairs,
            heldout_kto=heldout.kto, heldout_pairs=heldout.pairs, config=CONFIG,
            tokenizer=tokenizer, budget=TokenBudget(), on_step=steps.append,
        )  # fmt: skip
    return Run(trained, batches, steps)


def test_it_learns_a_planted_preference(run: Run) -> None:
    """Held-out subjects: the marker's answers score above the others, pairs and ratings alike."""
    metrics = run.trained.metrics
    assert metrics["rm_heldout_pairs"] == 12 and metrics["rm_heldout_pointwise"] == 12
    assert metrics["rm_heldout_accuracy"] >= 0.8, metrics
    assert metrics["rm_pair_accuracy"] >= 0.8 and metrics["rm_pointwise_accuracy"] >= 0.7
    assert metrics["rm_heldout_correct"] == round(24 * metrics["rm_heldout_accuracy"])
    assert 0 <= metrics["rm_brier"] < 0.25  # better than always forecasting one half
    assert 0 <= metrics["rm_ece"] <= 1
    assert metrics["rm_train_pairs"] == 28 and metrics["rm_train_pointwise"] == 28

    history = run.trained.history
    per_epoch = -(-56 // CONFIG.batch_size)
    assert run.steps == list(range(1, CONFIG.epochs * per_epoch + 1))
    assert [entry["step"] for entry in history] == run.steps
    assert {entry["phase"] for entry in history} == {"reward_model"}
    assert metrics["rm_train_loss"] < history[0]["loss"]


def test_batches_stay_within_the_token_budget(run: Run) -> None:
    """Every forward pass, training's and the held-out scoring's, holds at most
    `batch_tokens` padded tokens of at most `max_length` each."""
    budget = run.trained.budget
    assert run.batches
    for sequences, longest in run.batches:
        assert sequences * longest <= budget.batch_tokens
        assert longest <= budget.max_length


def test_the_adapter_and_the_score_head_are_trained(run: Run, tiny_model_dir: Path) -> None:
    """LoRA's B matrices moved from zero, and the score head from its seeded initial values."""
    model = run.trained.model
    named = dict(model.named_parameters())
    lora_b = [p for name, p in named.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)
    (head,) = [p for name, p in named.items() if "score" in name and p.requires_grad]
    (frozen,) = [p for name, p in named.items() if "score.original_module" in name]
    torch.manual_seed(CONFIG.seed)
    initial = load_classifier(tiny_model_dir).score.weight
    assert torch.equal(frozen.detach().cpu(), initial)  # the seed gives the initial head again
    assert head.shape == initial.shape == (1, 32)
    assert not torch.allclose(head.detach().cpu(), initial)


def test_the_checkpoint_verifies_and_loads_to_the_same_scores(
    run: Run, tiny_model_dir: Path, heldout: Ratings, tmp_path: Path
) -> None:
    """Saved atomically with hashes and a self-describing manifest; loaded, it scores as the
    trained model did; an altered file, or another kind of checkpoint, is refused."""
    path = save_reward_model(run.trained, tmp_path, "rm1", {"training_run": 7})
    manifest = verify_checkpoint(path)
    assert manifest["kind"] == "reward_model" and manifest["training_run"] == 7
    assert manifest["base_model"] == str(tiny_model_dir)
    assert manifest["config"] == CONFIG.to_dict()
    assert manifest["metrics"] == json.loads(json.dumps(run.trained.metrics))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest["files"])
    assert any("score" in key for key in load_file(path / "adapter_model.safetensors"))

    prompts = [row.prompt for row in heldout.kto] + [row.prompt for row in heldout.pairs]
    answers = [row.completion for row in heldout.kto] + [row.chosen for row in heldout.pairs]
    expected = run.trained.scorer().score(prompts, answers)
    loaded = RewardScorer.load(tiny_model_dir, path)
    assert loaded.manifest == manifest and loaded.budget == run.trained.budget
    assert loaded.score(prompts, answers) == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1

    altered = shutil.copytree(path, tmp_path / "altered")
    weights = altered / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=r"adapter_model\.safetensors"):
        RewardScorer.load(tiny_model_dir, altered)

    policy = shutil.copytree(path, tmp_path / "policy")
    (policy / "manifest.json").write_text(json.dumps({**manifest, "kind": "adapter"}))
    with pytest.raises(CorruptCheckpoint, match="not a reward_model"):
        RewardScorer.load(tiny_model_dir, policy)


def test_long_rows_are_cut_by_the_truncation_rule(
    run: Run, tiny_model_dir: Path, tokenizer: Any
) -> None:
    """Prompts and answers of thousands of tokens train and score; what lies before the prompt's
    kept end, or after the answer's kept start, changes nothing."""
    budget = TokenBudget(max_length=64, max_prompt_length=32, batch_tokens=256)
    question = " ".join(f"question{i}" for i in range(40))
    start = " ".join(f"answer{i}" for i in range(60))

    def long_text(seed: int) -> str:
        rng = random.Random(seed)
        return " ".join(rng.choice(("alpha", "beta", "gamma", "delta")) for _ in range(3000))

    prompts = [chat_prompt(tokenizer, f"{long_text(i)} {question}") for i in range(2)]
    answers = [f"{start} {long_text(10 + i)}" for i in range(2)]
    assert (
        len(tokenizer(prompts[0]).input_ids) > 3000 and len(tokenizer(answers[0]).input_ids) > 3000
    )

    scorer = RewardScorer(run.trained.model.eval(), tokenizer, budget)
    scores = scorer.score(
        [prompts[0], prompts[1], prompts[0]], [answers[0], answers[0], answers[1]]
    )
    assert scores == pytest.approx([scores[0]] * 3, abs=1e-5)
    assert scorer.score([prompts[0]], ["A short answer."]) != pytest.approx(scores[:1])

    long_kto = [
        KtoRow(p, a, i == 0, i, i, 1, NOW)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    long_pairs = [PairRow(prompts[0], answers[0], answers[1], "correction", 5, 1, NOW)]
    quick = RewardModelConfig(lora_r=2, lora_alpha=4, epochs=1, batch_size=2)
    trained = train_reward_model(
        tiny_model_dir, train_kto=long_kto, train_pairs=long_pairs, heldout_kto=long_kto,
        heldout_pairs=long_pairs, config=quick, tokenizer=tokenizer, budget=budget,
    )  # fmt: skip
    assert len(trained.history) == 2 and trained.metrics["rm_heldout_pointwise"] == 2


def test_held_out_figures_on_constructed_numbers() -> None:
    """Accuracy counts a positive margin and a score whose sign matches its label; Brier and
    calibration use the sigmoid of each, a pair counted both ways round for the calibration."""
    metrics = reward_metrics([2.0, -1.0], [3.0, -2.0, 0.5], [True, True, False])
    assert metrics["rm_heldout_correct"] == 2
    assert metrics["rm_heldout_accuracy"] == pytest.approx(2 / 5)
    assert metrics["rm_pair_accuracy"] == 0.5
    assert metrics["rm_pointwise_accuracy"] == pytest.approx(1 / 3)
    sigmoid = torch.sigmoid(torch.tensor([2.0, -1.0, 3.0, -2.0, 0.5], dtype=torch.float64))
    truth = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    assert metrics["rm_brier"] == pytest.approx(float(((sigmoid - truth) ** 2).mean()))
    assert 0 < metrics["rm_ece"] <= 1

    assert reward_metrics([], [], []) == {
        "rm_heldout_pairs": 0, "rm_heldout_pointwise": 0, "rm_heldout_correct": 0,
    }  # fmt: skip
    # Perfectly calibrated forecasts: 0.75 in one bin where 3 of 4 outcomes happened.
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0)
    assert expected_calibration_error([0.9, 0.1], [0, 1]) == pytest.approx(0.9)
    # A pair forecast at 0.75, counted both ways round at half weight: 0.25 off in each bin.
    assert reward_metrics([1.0986123], [], [])["rm_ece"] == pytest.approx(0.25, abs=1e-6)


# In rounds


def test_a_round_trains_keeps_and_reports_its_reward_model(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    """Every round trains a reward model on its training ratings: its held-out figures are on
    the run, and its verified checkpoint is kept, named after the round."""
    settings = settings.model_copy(update={"training_min_items": 4})
    rate_with_corrections(client, admin, RATED)
    run_id = start(sessions, {"train": FAST, "gate": QUICK_GATE, "reward_model": {"epochs": 1}})
    assert run_round(sessions, settings, run_id) is RunStatus.succeeded
    run = client.get(f"/v1/training/runs/{run_id}", headers=admin).json()
    metrics = run["metrics"]
    assert run["config"]["reward_model"]["epochs"] == 1
    assert {"rm_heldout_accuracy", "rm_brier", "rm_ece", "rm_train_loss"} <= set(metrics)
    assert metrics["rm_heldout_pairs"] == run["counts"]["heldout_pairs"] > 0
    path = Path(metrics["reward_model_path"])
    assert path == settings.reward_models_dir / f"rm.run{run_id}"
    manifest = verify_checkpoint(path)
    assert manifest["kind"] == "reward_model" and manifest["training_run"] == run_id
    assert manifest["metrics"]["rm_heldout_accuracy"] == metrics["rm_heldout_accuracy"]


def test_a_round_without_a_reward_model_trains_none(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings
) -> None:
    settings = settings.model_copy(update={"training_min_items": 4, "training_reward_model": False})
    rate_with_corrections(client, admin, RATED)
    run_id = start(sessions, {"train": FAST, "gate": QUICK_GATE})
    assert run_round(sessions, settings, run_id) is RunStatus.succeeded
    run = client.get(f"/v1/training/runs/{run_id}", headers=admin).json()
    assert "reward_model" not in run["config"]
    assert not [name for name in run["metrics"] if name.startswith("rm_")]
    assert not settings.reward_models_dir.exists()


def test_a_round_removes_the_reward_models_of_rounds_that_published_nothing(
    client: TestClient, sessions: Any, settings: Settings
) -> None:
    """Kept: a live round's and a finished round's with a version; removed: a failed round's,
    partial writes, and one named after the round that cleans up (which has written none yet:
    the database was restored or reset since, and run ids started again)."""
    from app.engine.checkpoints import write_checkpoint
    from app.services.training import claim, request_run
    from worker.training.rounds import _remove_stale_reward_models

    with sessions() as session:
        failed = TrainingRun(status=RunStatus.failed, trigger="manual")
        published = TrainingRun(status=RunStatus.rejected, trigger="manual")
        published.version_id = session.scalars(select(ModelVersion.id)).one()  # v0
        session.add_all([failed, published])
        session.commit()
        live, _ = request_run(session, trigger="manual")
        assert claim(session, live.id)
        runs = {"failed": failed.id, "published": published.id, "live": live.id}

    directory = settings.reward_models_dir
    for run_id in runs.values():
        write_checkpoint(
            directory, f"rm.run{run_id}", lambda d: (d / "w").write_text("w"),
            {"kind": "reward_model", "training_run": run_id},
        )  # fmt: skip
    (directory / ".tmp-rm.run9-0000").mkdir()
    with sessions() as session:
        _remove_stale_reward_models(session, directory, own_run=runs["published"] + 100)
    kept = sorted(p.name for p in directory.iterdir())
    assert kept == sorted(f"rm.run{runs[n]}" for n in ("published", "live"))
    with sessions() as session:  # the live round cleans up: a directory named after it is stale
        _remove_stale_reward_models(session, directory, own_run=runs["live"])
    assert [p.name for p in directory.iterdir()] == [f"rm.run{runs['published']}"]
