"""How each task's input becomes the user message given to the model."""

from __future__ import annotations

from typing import Any

import pycountry

from app.models import Task


def language_name(code: str) -> str | None:
    """English name of an ISO 639-1 language code, or None when the code is unknown."""
    if len(code) != 2 or not code.isalpha():
        return None
    language = pycountry.languages.get(alpha_2=code.lower())
    return None if language is None else str(language.name)


def user_message(task: Task, data: dict[str, Any]) -> str:
    """The instruction for one task, written the way instruct models are tuned to follow."""
    if task is Task.generate:
        return str(data["prompt"])
    if task is Task.translate:
        target = language_name(data["target_lang"])
        source = language_name(data["source_lang"]) if data.get("source_lang") else None
        origin = f" from {source}" if source else ""
        return (
            f"Translate the following text{origin} to {target}. "
            f"Reply with the translation only.\n\n{data['text']}"
        )
    if data.get("context"):
        return (
            "Answer the question using the context below.\n\n"
            f"Context:\n{data['context']}\n\nQuestion: {data['question']}"
        )
    return str(data["question"])
