"""The exact prompt text for a conversation, rendered by a tokenizer's chat template."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]] | str) -> str:
    """The exact prompt text for a conversation (or one user turn), by the chat template."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(rendered)
