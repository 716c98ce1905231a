"""Preference optimisation of a LoRA adapter with TRL: KTO on single ratings, DPO on pairs."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainerCallback

from app.services.datasets import KtoRow, PairRow
from app.training_config import TokenBudget, TrainConfig
from worker.training.batches import OnBatch, no_batches, ratings_of

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What training produced: the adapted model and its logged curves."""

    model: PeftModel
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class _Heartbeat(TrainerCallback):
    """Calls back after every optimiser step, so the round can show it is alive."""

    def __init__(self, on_step: Callable[[int], None]) -> None:
        self.on_step = on_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.on_step(int(state.global_step))


def load_base(path: Path) -> PreTrainedModel:
    """The base model in float32 (training on CPU in bfloat16 loses too much precision)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def kto_weights(rows: Sequence[KtoRow]) -> tuple[float, float]:
    """(desirable, undesirable) weights keeping the weighted ratio within TRL's advised 1 to 4/3."""
    desirable = sum(row.label for row in rows)
    undesirable = len(rows) - desirable
    if desirable == 0 or undesirable == 0:
        return 1.0, 1.0
    ratio = desirable / undesirable
    if ratio < 1:
        return undesirable / desirable, 1.0
    if ratio > 4 / 3:
        return 1.0, 3 * desirable / (4 * undesirable)
    return 1.0, 1.0


ANSWER_KEYS = ("completion_ids", "KL_completion_ids", "chosen_ids", "rejected_ids")
"""The answer columns of TRL's tokenized KTO and DPO rows, each after the row's `prompt_ids`."""


def truncate_row(row: dict[str, Any], budget: TokenBudget) -> dict[str, Any]:
    """A tokenized TRL row cut by the truncation rule: the kept prompt, then each answer."""
    cut = {**row, "prompt_ids": budget.truncate(row["prompt_ids"], [])[0]}
    for key in ANSWER_KEYS:
        if key in row:
            cut[key] = budget.truncate(row["prompt_ids"], row[key])[1]
    return cut


ROW = "flm_row"
"""The dataset column holding each row's index in the rows given to `train_adapter`."""
HELD = "flm_held_rows"
"""The batch key listing the rows whose data the batch holds (its own, and those KTO borrowed
completions from for its KL term)."""


class _Truncating:
    """Cuts each tokenized row by the budget's truncation rule before TRL's collator pads it, and
    notes in the batch (`HELD`) which rows it holds."""

    def __init__(
        self,
        collate: Callable[[list[dict[str, Any]]], Any],
        budget: TokenBudget,
        completions: dict[tuple[int, ...], list[int]] | None = None,
    ) -> None:
        self.collate = collate
        self.budget = budget
        self.completions = completions or {}
        """Rows by their tokenized completion, to tell whose completion a KL term borrows."""

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        held = {row[ROW] for row in rows}
        for row in rows:
            if "KL_completion_ids" in row:
                held.update(self.completions.get(tuple(row["KL_completion_ids"]), ()))
        batch = self.collate([truncate_row(row, self.budget) for row in rows])
        batch[HELD] = torch.tensor(sorted(held), dtype=torch.long)
        return batch


def _report_batches(trainer: Trainer, rows: Sequence[KtoRow | PairRow], on_batch: OnBatch) -> None:
    """Tell `on_batch` the ratings of each micro-batch before its forward and backward pass, and
    None once they are done (a failure in between, the optimiser step say, is in no batch)."""
    step = trainer.training_step

    def training_step(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        held = inputs.pop(HELD).tolist()
        on_batch(ratings_of(rows[index] for index in held))
        loss = step(model, inputs, *args, **kwargs)
        on_batch(None)
        return loss

    setattr(trainer, "training_step", training_step)  # noqa: B010 (a method: mypy refuses =)


def micro_batches(
    config: TrainConfig, budget: TokenBudget, sequences: int = 1, least: int = 1
) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per optimiser step): at most `budget.batch_tokens`
    tokens computed with gradients at once (a row is `sequences` of up to `max_length`: DPO's
    chosen and rejected answers are two, KTO's answer one, its KL term's runs without
    gradients), at least `least` rows (KTO's KL term pairs rows), about `config.batch_size`
    rows per optimiser step."""
    fit = budget.batch_tokens // (sequences * budget.max_length)
    rows = min(config.batch_size, max(least, fit))
    return rows, math.ceil(config.batch_size / rows)


def train_adapter(
    base_path: Path,
    parent_adapter: Path | None,
    kto_rows: Sequence[KtoRow],
    pair_rows: Sequence[PairRow],
    config: TrainConfig,
    tokenizer: Any,
    on_step: Callable[[int], None] = lambda step: None,
    budget: TokenBudget = TokenBudget(),
    on_batch: OnBatch = no_batches,
) -> TrainResult:
    """Train a LoRA adapter (continuing `parent_adapter` when given) against the original base,
    on rows cut by the budget's truncation rule, in micro-batches within its token budget;
    `on_batch` is told the ratings of each micro-batch as it is computed on."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    torch.manual_seed(config.seed)
    policy_base = load_base(base_path)
    if parent_adapter is not None:
        model = PeftModel.from_pretrained(policy_base, parent_adapter, is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(policy_base, lora)
    # The reference is the original base, loaded separately: TRL would otherwise use a copy of the
    # starting adapter, and rounds would drift further from the base one reference at a time.
    reference = load_base(base_path).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)

    common: dict[str, Any] = {
        "num_train_epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "beta": config.beta,
        # The budget truncates (keeping the prompt's end and the answer's start, see
        # `_Truncating`); TRL's own rule keeps the start and drops rows whose prompt fills
        # max_length, so a long prompt would lose its whole answer or the row.
        "max_length": None,
        "seed": config.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        # On a GPU host (docker-compose.gpu.yml) training runs there, the gate after it too.
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        # TRL turns on bfloat16 autocast by default: on a CPU without native bfloat16 that makes
        # a step over 20 times slower. Activation checkpointing stays on: without it backward
        # kept about 3 MiB a token of a micro-batch, with it about 1.7 (bench/abuse.py).
        "bf16": False,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        # The rows keep their index (`ROW`), so that each batch can say whose ratings it holds.
        "remove_unused_columns": False,
    }
    result = TrainResult(model=model)
    callbacks: list[TrainerCallback] = [_Heartbeat(on_step)]
    with tempfile.TemporaryDirectory(prefix="flm-train-") as scratch:
        if kto_rows:
            desirable_weight, undesirable_weight = kto_weights(kto_rows)
            kto = KTOTrainer(
                model=model,
                ref_model=reference,
                args=KTOConfig(
                    output_dir=scratch,
                    desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight,
                    **_batching(micro_batches(config, budget, sequences=1, least=2)),
                    **common,
                ),
                train_dataset=_dataset(kto_rows),
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            completions: dict[tuple[int, ...], list[int]] = {}
            tokenized = kto.train_dataset
            assert isinstance(tokenized, Dataset)
            for ids, index in zip(tokenized["completion_ids"], tokenized[ROW], strict=True):
                completions.setdefault(tuple(ids), []).append(index)
            kto.data_collator = _Truncating(kto.data_collator, budget, completions)
            _report_batches(kto, kto_rows, on_batch)
            kto.train()
            result.history += _steps(kto.state.log_history, "kto")
        if pair_rows:
            dpo = DPOTrainer(
                model=model,
                ref_model=reference,
                args=DPOConfig(
                    output_dir=scratch,
                    **_batching(micro_batches(config, budget, sequences=2)),
                    **common,
                ),
                train_dataset=_dataset(pair_rows),
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            dpo.data_collator = _Truncating(dpo.data_collator, budget)
            _report_batches(dpo, pair_rows, on_batch)
            dpo.train()
            result.history += _steps(dpo.state.log_history, "dpo")
    result.metrics = _summary(result.history)
    model.eval()
    return result


def _batching(batches: tuple[int, int]) -> dict[str, Any]:
    rows, accumulation = batches
    return {"per_device_train_batch_size": rows, "gradient_accumulation_steps": accumulation}


def _dataset(rows: Sequence[KtoRow | PairRow]) -> Dataset:
    """The rows in TRL's format, each with its index (`ROW`)."""
    return Dataset.from_list([{**row.trl(), ROW: index} for index, row in enumerate(rows)])


def _steps(log_history: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    keep = ("loss", "kl", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm")
    return [
        {"phase": phase, "step": entry["step"], **{k: float(entry[k]) for k in keep if k in entry}}
        for entry in log_history
        if "loss" in entry
    ]


def _summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of each curve, per phase (e.g. `kto_loss`, `dpo_rewards/margins`)."""
    summary: dict[str, float] = {}
    for entry in history:
        for key, value in entry.items():
            if key not in {"phase", "step"}:
                summary[f"{entry['phase']}_{key}"] = value
    return summary
