"""Generation requests and the recorded generations."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from app.models import Generation, Task
from app.schemas.common import NonBlank, SamplingFields

LangCode = Annotated[
    str, Field(min_length=2, max_length=2, description="ISO 639-1 code", examples=["fr"])
]


class GenerateRequest(SamplingFields):
    """Free generation: the model answers the prompt as a chat message."""

    prompt: Annotated[NonBlank, Field(examples=["Write a haiku about autumn."])]

    def task_input(self) -> dict[str, Any]:
        """The task's input fields, as stored."""
        return {"prompt": self.prompt}


class TranslateRequest(SamplingFields):
    """Translation of a text into another language."""

    text: Annotated[NonBlank, Field(examples=["The weather is lovely today."])]
    target_lang: LangCode
    source_lang: Annotated[
        str | None, Field(min_length=2, max_length=2, examples=["en"], description="ISO 639-1")
    ] = None

    def task_input(self) -> dict[str, Any]:
        """The task's input fields, as stored (language codes in lower case)."""
        source = self.source_lang.lower() if self.source_lang else None
        return {"text": self.text, "target_lang": self.target_lang.lower(), "source_lang": source}


class QARequest(SamplingFields):
    """Question answering, optionally grounded in a given context."""

    question: Annotated[NonBlank, Field(examples=["What is the capital of France?"])]
    context: Annotated[str | None, Field(examples=[None])] = None

    def task_input(self) -> dict[str, Any]:
        """The task's input fields, as stored."""
        return {"question": self.question, "context": self.context}


class Usage(BaseModel):
    """Token counts of one generation."""

    prompt_tokens: int
    completion_tokens: int


class GenerationPublic(BaseModel):
    """A recorded generation."""

    id: int
    task: Task
    input: dict[str, Any] = Field(description="The task's input fields as sent.")
    output: str
    model_version: str = Field(description="The exact version that wrote the output.")
    usage: Usage
    finish_reason: str = Field(description="`stop` (the model ended) or `length` (cut off).")
    params: dict[str, Any] = Field(description="Sampling parameters used.")
    model_prompt: str = Field(description="The exact text given to the model.")
    latency_ms: int
    created_at: datetime

    @classmethod
    def of(cls, generation: Generation) -> GenerationPublic:
        """Build from the ORM row."""
        return cls(
            id=generation.id,
            task=generation.task,
            input=generation.input,
            output=generation.output,
            model_version=generation.version.name,
            usage=Usage(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
            ),
            finish_reason=generation.finish_reason,
            params=generation.params,
            model_prompt=generation.prompt,
            latency_ms=generation.latency_ms,
            created_at=generation.created_at,
        )


class GenerateResponse(GenerationPublic):
    """A generation, with the request's input fields beside it."""

    prompt: str


class TranslateResponse(GenerationPublic):
    """A translation, with the request's input fields beside it."""

    text: str
    target_lang: str
    source_lang: str | None


class QAResponse(GenerationPublic):
    """An answer, with the request's input fields beside it."""

    question: str
    context: str | None


class GenerationPage(BaseModel):
    """One page of generations, newest first."""

    items: list[GenerationPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )
