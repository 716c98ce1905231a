"""Scoring answers with a trained reward model: the base model as a one-output sequence classifier
with the reward model's LoRA adapter and score head, loaded from a verified checkpoint.

Training (`worker/training/reward_model.py`) encodes, batches and scores through the functions
here, so that a score during training and after loading is computed the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.engine.checkpoints import CorruptCheckpoint, verify_checkpoint
from app.training_config import TokenBudget, token_batches

KIND = "reward_model"
"""The `kind` in a reward model checkpoint's manifest."""


def sequence_scores(model: Any, sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """The reward of each token sequence, in one forward pass over them right-padded (with
    gradients unless the caller turned them off)."""
    device = next(model.parameters()).device
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = 1
    # The classifier reads the rightmost token that is not the pad id, as TRL's RewardTrainer
    # models do, so a checkpoint scores the same here and in Hugging Face's tools.
    output = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    scores: torch.Tensor = output.logits[:, 0].float()
    return scores


def pad_id_of(tokenizer: Any) -> int:
    """The id sequences are padded with: the tokenizer's pad token, else its EOS."""
    pad = tokenizer.pad_token_id
    return int(tokenizer.eos_token_id if pad is None else pad)


def load_classifier(base_path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The base model as a one-output sequence classifier; its score head is freshly initialised
    (from torch's current seed) and its pad token id is set, which batched scoring needs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    # A causal LM checkpoint has no score head: the "newly initialised" warning is expected.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=1, dtype=dtype
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_id_of(tokenizer)
    model.config.use_cache = False
    return model


@dataclass
class RewardScorer:
    """A reward model ready to score answers to prompts."""

    model: Any
    tokenizer: Any
    budget: TokenBudget = field(default_factory=TokenBudget)
    manifest: dict[str, Any] = field(default_factory=dict)
    """The checkpoint's manifest (empty for a model that was never saved)."""

    @classmethod
    def load(cls, base_path: Path, path: Path, budget: TokenBudget | None = None) -> RewardScorer:
        """Verify a reward model checkpoint and load it on `base_path`'s base model, its adapter
        merged; `budget` defaults to the one it was trained with."""
        from peft import PeftModel
        from transformers import AutoTokenizer

        manifest = verify_checkpoint(path)
        if manifest.get("kind") != KIND:
            raise CorruptCheckpoint(f"{path} holds a {manifest.get('kind')!r}, not a {KIND}")
        if budget is None:
            budget = TokenBudget(**manifest.get("token_budget", {}))
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        model = PeftModel.from_pretrained(load_classifier(base_path), str(path))
        return cls(model.merge_and_unload().eval(), tokenizer, budget, manifest)

    def score(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        on_batch: Callable[[list[int] | None], None] = lambda batch: None,
    ) -> list[float]:
        """The reward of each answer to its prompt (an exact prompt, as rendered for the model),
        both cut by the truncation rule, in batches of at most `budget.batch_tokens` padded
        tokens; `on_batch` is told the indices of each batch's items before it is scored, and
        None once it is done."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        encoded = [
            self.budget.encode(self.tokenizer, prompt, answer)[0]
            for prompt, answer in zip(prompts, answers, strict=True)
        ]
        pad = pad_id_of(self.tokenizer)
        scores = [0.0] * len(encoded)
        with torch.inference_mode():
            for batch in token_batches([len(ids) for ids in encoded], self.budget.batch_tokens):
                on_batch(batch)
                values = sequence_scores(self.model, [encoded[i] for i in batch], pad).tolist()
                on_batch(None)
                for index, value in zip(batch, values, strict=True):
                    scores[index] = float(value)
        return scores
