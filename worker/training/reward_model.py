"""A reward model trained from the ratings: the base model as a one-output sequence classifier with
a LoRA adapter, its score head trained whole; Bradley-Terry on pairs (comparisons, corrections),
a logistic loss on single ratings (thumbs, stars)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from app.engine.checkpoints import write_checkpoint
from app.engine.reward_model import (
    KIND,
    RewardScorer,
    load_classifier,
    pad_id_of,
    sequence_scores,
)
from app.rewards import sigmoid
from app.services.datasets import KtoRow, PairRow
from app.training_config import RewardModelConfig, TokenBudget, token_batches
from worker.training.batches import OnBatch, no_batches, ratings_of

CALIBRATION_BINS = 10
"""Equal-width probability bins of the expected calibration error."""


@dataclass
class TrainedRewardModel:
    """What training produced: the model, how it was trained, its held-out figures and curve."""

    model: PeftModel
    tokenizer: Any
    base_path: Path
    config: RewardModelConfig
    budget: TokenBudget
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def scorer(self) -> RewardScorer:
        """A scorer on the trained model as it is in memory."""
        return RewardScorer(self.model.eval(), self.tokenizer, self.budget)


@dataclass(frozen=True)
class _Row:
    """A training row, tokenized: a pair's (chosen, rejected), or a single rating's answer."""

    sequences: tuple[list[int], ...]
    label: bool | None
    """A single rating's label (True: desirable); None for a pair."""
    source: KtoRow | PairRow


def _rows(
    tokenizer: Any, kto: Sequence[KtoRow], pairs: Sequence[PairRow], budget: TokenBudget
) -> list[_Row]:
    rows = [
        _Row((budget.encode(tokenizer, row.prompt, row.completion)[0],), row.label, row)
        for row in kto
    ]
    for pair in pairs:
        chosen = budget.encode(tokenizer, pair.prompt, pair.chosen)[0]
        rejected = budget.encode(tokenizer, pair.prompt, pair.rejected)[0]
        rows.append(_Row((chosen, rejected), None, pair))
    return rows


def _micro_batches(rows: Sequence[_Row], batch_tokens: int) -> list[list[int]]:
    """Indices of `rows` in groups of at most `batch_tokens` padded tokens, pairs and single
    ratings apart (a pair's two answers stay in one group, for its loss)."""
    pairs = [i for i, row in enumerate(rows) if row.label is None]
    singles = [i for i, row in enumerate(rows) if row.label is not None]
    # A pair's group pads both answers of every pair to the longest: two sequences a row.
    pair_lengths = [max(map(len, rows[i].sequences)) for i in pairs]
    single_lengths = [len(rows[i].sequences[0]) for i in singles]
    return [
        *([pairs[j] for j in batch] for batch in token_batches(pair_lengths, batch_tokens // 2)),
        *([singles[j] for j in batch] for batch in token_batches(single_lengths, batch_tokens)),
    ]


def _loss(model: Any, rows: Sequence[_Row], pad_id: int, pointwise_weight: float) -> torch.Tensor:
    """The summed loss of rows that are all pairs or all single ratings."""
    if rows[0].label is None:
        chosen, rejected = sequence_scores(
            model, [*(r.sequences[0] for r in rows), *(r.sequences[1] for r in rows)], pad_id
        ).chunk(2)
        return -F.logsigmoid(chosen - rejected).sum()
    scores = sequence_scores(model, [r.sequences[0] for r in rows], pad_id)
    labels = torch.tensor([float(bool(r.label)) for r in rows], device=scores.device)
    return pointwise_weight * F.binary_cross_entropy_with_logits(scores, labels, reduction="sum")


def train_reward_model(
    base_path: Path,
    *,
    train_kto: Sequence[KtoRow],
    train_pairs: Sequence[PairRow],
    heldout_kto: Sequence[KtoRow],
    heldout_pairs: Sequence[PairRow],
    config: RewardModelConfig,
    tokenizer: Any,
    budget: TokenBudget = TokenBudget(),
    on_step: Callable[[int], None] | None = None,
    on_batch: OnBatch = no_batches,
) -> TrainedRewardModel:
    """Train a reward model on rows cut by the budget's truncation rule, in micro-batches within
    its token budget, and measure it on the held-out rows; `on_step` is called after each
    optimiser step, `on_batch` told the ratings of each batch as it is computed on."""
    # TRL's RewardTrainer (its collator and its loss) takes only (chosen, rejected) pairs, and a
    # thumb or stars rating has no partner answer, so both losses are summed in one small loop.
    kept_kto = train_kto if config.pointwise_weight > 0 else []
    if not kept_kto and not train_pairs:
        raise ValueError("no training rows with a weight for the reward model")
    torch.manual_seed(config.seed)  # the score head's initial weights are drawn as it loads
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="SEQ_CLS",  # the score head joins the adapter's trained, saved modules
    )
    model = get_peft_model(load_classifier(base_path), lora)
    assert isinstance(model, PeftModel)
    if torch.cuda.is_available():  # on a GPU host (docker-compose.gpu.yml) it trains there
        model.to("cuda")
    rows = _rows(tokenizer, kept_kto, train_pairs, budget)
    pad_id = pad_id_of(tokenizer)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    order = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    model.train()
    for epoch in range(config.epochs):
        shuffled = torch.randperm(len(rows), generator=order).tolist()
        for start in range(0, len(rows), config.batch_size):
            step_rows = [rows[i] for i in shuffled[start : start + config.batch_size]]
            # A weighted mean over the step's rows, whatever its micro-batches.
            weight = sum(1.0 if r.label is None else config.pointwise_weight for r in step_rows)
            total = 0.0
            optimizer.zero_grad(set_to_none=True)
            for batch in _micro_batches(step_rows, budget.batch_tokens):
                held = [step_rows[i] for i in batch]
                on_batch(ratings_of(r.source for r in held))
                loss = _loss(model, held, pad_id, config.pointwise_weight) / weight
                loss.backward()
                on_batch(None)
                total += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            step = len(history) + 1
            history.append(
                {"phase": "reward_model", "step": step, "epoch": epoch + 1, "loss": total,
                 "grad_norm": float(grad_norm)}
            )  # fmt: skip
            if on_step is not None:
                on_step(step)
    trained = TrainedRewardModel(model, tokenizer, base_path, config, budget, history=history)
    last_epoch = [entry["loss"] for entry in history if entry["epoch"] == config.epochs]
    trained.metrics = {
        "rm_train_loss": sum(last_epoch) / len(last_epoch),
        "rm_train_pointwise": len(kept_kto),
        "rm_train_pairs": len(train_pairs),
        **heldout_metrics(trained.scorer(), heldout_kto, heldout_pairs, on_batch),
    }
    return trained


def heldout_metrics(
    scorer: RewardScorer,
    kto: Sequence[KtoRow],
    pairs: Sequence[PairRow],
    on_batch: OnBatch = no_batches,
) -> dict[str, Any]:
    """Accuracy and calibration of a reward model on held-out rows (none: only the counts)."""

    def scores(
        prompts: list[str], answers: list[str], rows: Sequence[KtoRow | PairRow]
    ) -> list[float]:
        def holding(batch: list[int] | None) -> None:
            on_batch(None if batch is None else ratings_of(rows[i] for i in batch))

        return scorer.score(prompts, answers, holding)

    pointwise = scores([r.prompt for r in kto], [r.completion for r in kto], kto) if kto else []
    margins: list[float] = []
    if pairs:
        prompts = [p.prompt for p in pairs]
        chosen = scores(prompts, [p.chosen for p in pairs], pairs)
        rejected = scores(prompts, [p.rejected for p in pairs], pairs)
        margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return reward_metrics(margins, pointwise, [r.label for r in kto])


def reward_metrics(
    margins: Sequence[float], scores: Sequence[float], labels: Sequence[bool]
) -> dict[str, Any]:
    """Held-out figures from pairs' score margins (chosen minus rejected) and single ratings'
    scores with their labels: accuracy (a margin above zero; a score's sign matching its label),
    Brier score and expected calibration error of the sigmoid of each."""
    pair_hits = [m > 0 for m in margins]
    point_hits = [(s > 0) == label for s, label in zip(scores, labels, strict=True)]
    metrics: dict[str, Any] = {
        "rm_heldout_pairs": len(margins),
        "rm_heldout_pointwise": len(scores),
        "rm_heldout_correct": sum(pair_hits) + sum(point_hits),
    }
    if not margins and not scores:
        return metrics
    hits = pair_hits + point_hits
    metrics["rm_heldout_accuracy"] = sum(hits) / len(hits)
    if margins:
        metrics["rm_pair_accuracy"] = sum(pair_hits) / len(pair_hits)
    if scores:
        metrics["rm_pointwise_accuracy"] = sum(point_hits) / len(point_hits)
    pair_p = [sigmoid(m) for m in margins]  # P(chosen beats rejected)
    point_p = [sigmoid(s) for s in scores]  # P(desirable)
    forecasts = pair_p + point_p
    outcomes = [1.0] * len(pair_p) + [float(label) for label in labels]
    squared = [(p - y) ** 2 for p, y in zip(forecasts, outcomes, strict=True)]
    metrics["rm_brier"] = sum(squared) / len(squared)
    # A pair's outcome is always "chosen won", so each pair also counts the other way round
    # (1 - p, lost), at half weight each: the bins then see both outcomes, as they would with
    # pairs in a random order (the Brier score is the same either way).
    pair_weights = [0.5] * len(pair_p)
    metrics["rm_ece"] = expected_calibration_error(
        [*forecasts, *(1 - p for p in pair_p)],
        [*outcomes, *([0.0] * len(pair_p))],
        [*pair_weights, *([1.0] * len(point_p)), *pair_weights],
    )
    return metrics


def expected_calibration_error(
    forecasts: Sequence[float],
    outcomes: Sequence[float],
    weights: Sequence[float] | None = None,
    bins: int = CALIBRATION_BINS,
) -> float:
    """Mean gap between forecast probability and observed frequency over equal-width bins,
    each bin weighted by the (weighted) share of forecasts it holds."""
    if weights is None:
        weights = [1.0] * len(forecasts)
    forecast_sums, outcome_sums = [0.0] * bins, [0.0] * bins
    for p, y, w in zip(forecasts, outcomes, weights, strict=True):
        cell = min(int(p * bins), bins - 1)
        forecast_sums[cell] += w * p
        outcome_sums[cell] += w * y
    total = sum(weights)
    gaps = (abs(p - y) for p, y in zip(forecast_sums, outcome_sums, strict=True))
    return sum(gaps) / total if total else 0.0


def save_reward_model(
    trained: TrainedRewardModel,
    versions_dir: Path,
    name: str,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """Write the reward model's adapter and score head as a verified checkpoint `name`, its
    manifest holding `manifest` and how it was trained."""
    full = {
        "base_model": str(trained.base_path),
        **(manifest or {}),
        "kind": KIND,
        "config": trained.config.to_dict(),
        "token_budget": trained.budget.to_dict(),
        "metrics": trained.metrics,
    }
    return write_checkpoint(
        versions_dir, name, lambda d: trained.model.save_pretrained(str(d)), full
    )
