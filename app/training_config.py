"""Hyper-parameters of a training round and thresholds of its promotion gate.

Plain validated dataclasses: the API checks a requested override before queueing a round, and the
worker records the values used on the run and in the version's manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

if TYPE_CHECKING:
    from app.config import Settings

_STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_STRICT)
class TokenBudget:
    """Token limits shared by training, the gate and the API's correction cap; with the model's
    size they bound the worker's peak memory (TRAINING_* settings, see `app/config.py`)."""

    max_length: Annotated[int, Field(ge=16)] = 512
    """Prompt plus answer tokens (EOS included) a rating is trained and scored on."""
    max_prompt_length: Annotated[int, Field(ge=1)] = 256
    """Prompt tokens kept, its last ones (where the question and the assistant's turn are); the
    answer keeps its first `max_length` minus the kept prompt's length."""
    batch_tokens: Annotated[int, Field(ge=32)] = 1024
    """Padded tokens (sequences x longest) in one forward pass of the gate or one training
    micro-batch; at least twice `max_length`, as a training row is two sequences."""
    chunk_tokens: Annotated[int, Field(ge=1)] = 256
    """Positions projected to vocabulary logits at once when the gate scores log-probabilities."""

    @model_validator(mode="after")
    def _consistent(self) -> TokenBudget:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be below max_length, to leave the answer room")
        if self.batch_tokens < 2 * self.max_length:
            raise ValueError("batch_tokens must be at least twice max_length (KTO pairs rows)")
        return self

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenBudget:
        """The budget the settings give."""
        return cls(
            max_length=settings.training_max_length,
            max_prompt_length=settings.training_max_prompt_tokens,
            batch_tokens=settings.training_batch_tokens,
            chunk_tokens=settings.training_chunk_tokens,
        )

    @property
    def max_answer_tokens(self) -> int:
        """Longest answer text, in tokens, that is never cut whatever its prompt (EOS takes one)."""
        return self.max_length - self.max_prompt_length - 1

    def truncate(
        self, prompt_ids: Sequence[int], answer_ids: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """The truncation rule: the prompt's last `max_prompt_length` tokens, then the answer's
        first tokens up to `max_length` in all."""
        prompt = list(prompt_ids[len(prompt_ids) - self.max_prompt_length :])
        return prompt, list(answer_ids[: self.max_length - len(prompt)])

    def encode(self, tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int]:
        """Prompt, completion and EOS as token ids cut by the truncation rule, and the kept
        prompt's length: how the gate and the reward model see a rated answer."""
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
        kept_prompt, kept_completion = self.truncate(
            prompt_ids, [*completion_ids, tokenizer.eos_token_id]
        )
        return kept_prompt + kept_completion, len(kept_prompt)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return asdict(self)


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of rows, longest first, grouped so that rows x the longest stays within
    `batch_tokens` (a longer row goes alone)."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        batch = batches[-1] if batches else []
        if batch and (len(batch) + 1) * lengths[batch[0]] <= batch_tokens:
            batch.append(index)
        else:
            batches.append([index])
    return batches


@dataclass(frozen=True, config=_STRICT)
class TrainConfig:
    """How a round trains its LoRA adapter."""

    lora_r: Annotated[int, Field(ge=1, le=256)] = 16
    """LoRA rank (used when the round starts a new adapter)."""
    lora_alpha: Annotated[int, Field(ge=1)] = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    """Which linear layers get adapters (all of a Llama block's)."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-4
    """LoRA tolerates 1e-5 to 1e-4 for preference losses; at 5e-5 a round on the default model
    moved it by a KL of 0.0009, far inside the gate's bound."""
    epochs: Annotated[int, Field(ge=1, le=100)] = 2
    batch_size: Annotated[int, Field(ge=2, le=256)] = 8
    """Rows per optimiser step. KTO needs at least 2 per batch (its KL term pairs mismatched
    examples); TRL advises 4+. Micro-batches hold at most TokenBudget.batch_tokens tokens, and
    gradients accumulate over them up to this many rows."""
    beta: Annotated[float, Field(gt=0)] = 0.1
    """Strength of the pull towards the reference, which is always the original base model."""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values


@dataclass(frozen=True, config=_STRICT)
class GateConfig:
    """What a candidate must show before it serves anyone."""

    min_preference_gain: float = 0.0
    """Held-out gain it must exceed: how much more than the active version the candidate prefers
    what raters preferred, in mean per-token log-probability."""
    max_kl: Annotated[float, Field(gt=0)] = 0.5
    """Largest mean per-token KL(candidate || base) on the fixed prompts, in nats."""
    max_repetition: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Largest share of repeated 4-grams in its fixed-prompt answers (or the active's + 0.1)."""
    max_empty_fraction: Annotated[float, Field(ge=0, le=1)] = 0.25
    """Largest share of empty answers (or the active version's share, when higher)."""
    min_length_ratio: Annotated[float, Field(gt=0)] = 0.5
    """Shortest allowed mean answer length, relative to the active version's."""
    max_length_ratio: Annotated[float, Field(gt=0)] = 2.0
    """Longest allowed mean answer length, relative to the active version's."""
    max_new_tokens: Annotated[int, Field(ge=1, le=512)] = 48
    """Tokens generated per fixed prompt."""
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    """Fixed prompts generated together (held-out ratings are batched by token budget)."""
    # Bounds on the automatic evaluation's open prompts, each checked against the base's figures
    # and against the active version's (a slow drift over rounds and a jump in one round).
    max_repetition_growth: Annotated[float, Field(ge=1)] = 1.25
    """Largest repeated-word-trigram share, as a multiple of a reference version's (plus
    `repetition_slack`)."""
    repetition_slack: Annotated[float, Field(ge=0, le=1)] = 0.01
    """Absolute room above the repetition bound, so that noise on a near-zero share passes."""
    min_distinct_ratio: Annotated[float, Field(ge=0, le=1)] = 0.8
    """Smallest share of distinct word pairs, relative to a reference version's."""
    max_length_change: Annotated[float, Field(gt=0, le=10)] = 0.25
    """Largest relative change of the mean answer length in words, either way."""
    min_opening_ratio: Annotated[float, Field(ge=0, le=1)] = 0.6
    """Smallest variety of answer openings (first words, list or not), relative to a reference
    version's: low when answers collapse into one format."""
    max_perplexity_growth: Annotated[float, Field(ge=1)] = 1.5
    """Largest perplexity of its answers under the base model, as a multiple of a reference
    version's: its answers must stay language the base finds likely."""
    max_reference_drop: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Largest fall of the mean chrF/ROUGE-L against the references, in absolute terms."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return asdict(self)


@dataclass(frozen=True, config=_STRICT)
class RewardModelConfig:
    """How a round trains its reward model: the base model with a LoRA adapter and a scalar head."""

    lora_r: Annotated[int, Field(ge=1, le=256)] = 16
    """LoRA rank of the reward model's adapter."""
    lora_alpha: Annotated[int, Field(ge=1)] = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the LoRA path during training."""
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    """Which linear layers get adapters (all of a Llama block's); the score head is always
    trained whole."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-4
    """AdamW step size, for the adapter and the score head alike."""
    epochs: Annotated[int, Field(ge=1, le=100)] = 2
    """Passes over the training rows."""
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    """Rows (a pair or a single rating each) per optimiser step; micro-batches hold at most
    TokenBudget.batch_tokens padded tokens, and gradients accumulate over them."""
    pointwise_weight: Annotated[float, Field(ge=0)] = 1.0
    """Weight of a thumbs or stars row's logistic loss against a pair's Bradley-Terry loss."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Gradients are clipped to this norm before each optimiser step."""
    seed: int = 0
    """Seeds the score head's initial weights and the order of the rows."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values
