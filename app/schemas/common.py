"""Pieces shared by several request and response models."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from app.engine.requests import SamplingParams


def _holds_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list | tuple):
        return any(_holds_nul(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    return False


class InputModel(BaseModel):
    """A request body whose text may hold any character but NUL."""

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # PostgreSQL cannot store NUL in text; refusing it here gives a 422 instead of a 500.
        if _holds_nul(value):
            raise ValueError("must not contain the NUL character (\\u0000)")
        return value


class StrictModel(InputModel):
    """A request body: unknown fields are an error, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


NonBlank = Annotated[str, Field(min_length=1, pattern=r"\S")]
"""Text that is not empty and not only whitespace."""


class SamplingFields(StrictModel):
    """Sampling options accepted by every generation endpoint."""

    max_new_tokens: Annotated[int, Field(ge=1, le=1024, description="Most tokens to generate.")] = (
        128
    )
    temperature: Annotated[float, Field(ge=0, le=2, description="0 is greedy decoding.")] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1, description="Nucleus sampling mass.")] = 0.95
    seed: Annotated[
        int | None, Field(ge=0, le=2**32 - 1, description="Same seed, same input, same answer.")
    ] = None
    model_version: Annotated[
        str | None,
        Field(
            min_length=1, max_length=64,
            description="Answer with this version instead of the active one (admin keys only; "
            "for side-by-side comparisons).",
        ),
    ] = None  # fmt: skip
    stream: Annotated[
        StrictBool,
        Field(
            description="Send the answer as server-sent events: `delta` events with `text` as it "
            "is generated, then one `done` event holding the same object a non-streamed request "
            "answers (with the generation `id` to rate), or an `error` event. A JSON boolean: "
            '`1` or `"true"` is a 422.',
        ),
    ] = False

    def sampling(self) -> SamplingParams:
        """The engine's view of these options."""
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.seed)


class ErrorDetail(BaseModel):
    """One problem with a request, in FastAPI's validation-error shape."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """What every 4xx and 5xx answer carries."""

    detail: str | list[ErrorDetail]
