"""Text generation on the active version."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from app.ml.registry import ModelRegistry, ServingVersion


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one answer."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens."""
    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 0.95
    """Nucleus sampling mass, in (0, 1]."""
    seed: int | None = None
    """Makes sampling reproducible for the same prompt, parameters and version."""


@dataclass(frozen=True)
class Completion:
    """What the model produced for one prompt, and which version produced it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """`stop` when the model ended its answer, `length` when max_new_tokens cut it."""
    version: ServingVersion


class PromptTooLong(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's context of {context_length} tokens"
        )


class Engine:
    """Runs generation requests one at a time on the registry's active version."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        # One forward pass at a time: torch already uses every core for one batch, and the
        # global RNG that seeds sampling must not be shared between requests.
        self._lock = threading.Lock()

    def chat_prompt(self, user_message: str, version: ServingVersion | None = None) -> str:
        """The exact prompt text for one user turn, using the model's chat template."""
        tokenizer = (version or self.registry.active).tokenizer
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered)

    def generate(
        self, prompt: str, params: SamplingParams, version: ServingVersion | None = None
    ) -> Completion:
        """Generate one answer to a rendered prompt, on `version` (leased by the caller).

        Without `version` it leases the active one for the duration of the call.
        """
        if version is None:
            with self.registry.lease() as leased:
                return self._generate(prompt, params, leased)
        return self._generate(prompt, params, version)

    def _generate(self, prompt: str, params: SamplingParams, version: ServingVersion) -> Completion:
        tokenizer, model = version.tokenizer, version.model
        # The chat template already carries the special tokens; adding more would change the prompt.
        input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        prompt_tokens = int(input_ids.shape[1])
        if prompt_tokens + params.max_new_tokens > version.context_length:
            raise PromptTooLong(prompt_tokens, params.max_new_tokens, version.context_length)
        sampling: dict[str, object] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        with self._lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=params.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        new_tokens = output[0, prompt_tokens:]
        stopped = len(new_tokens) > 0 and int(new_tokens[-1]) == tokenizer.eos_token_id
        return Completion(
            text=str(tokenizer.decode(new_tokens, skip_special_tokens=True)),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_tokens),
            finish_reason="stop" if stopped else "length",
            version=version,
        )
