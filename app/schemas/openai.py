"""OpenAI-compatible request and response shapes (chat completions and completions).

Fields this service does not implement are accepted and ignored when they are left at their
neutral values, as OpenAI clients send many of them; ones that would change the answer and that
it cannot honour (n > 1, logprobs) are refused with a 422 that says so.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from app.engine.requests import SamplingParams
from app.schemas.common import InputModel


def _json_boolean(value: object) -> object:
    """A boolean field takes JSON true or false only: `0` or `"false"` is an error, not False."""
    if value is not None and not isinstance(value, bool):
        raise ValueError("must be a JSON boolean (true or false)")
    return value


class _OpenAIRequest(InputModel):
    """Sampling fields shared by both endpoints, in OpenAI's names."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[
        str,
        Field(
            min_length=1, max_length=200, examples=["default"],
            description="`default` or the active version's name; admins may name another "
            "version (GET /v1/models lists them).",
        ),
    ]  # fmt: skip
    max_tokens: Annotated[int | None, Field(ge=1, le=1024)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=1024)] = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: Annotated[int | None, Field(ge=0, le=2**32 - 1)] = None
    stop: Annotated[
        str | list[Annotated[str, Field(min_length=1)]] | None,
        Field(description="Up to 4 strings; the answer ends before the first one."),
    ] = None
    stream: StrictBool = False
    n: Annotated[int, Field(ge=1, le=1, description="Only 1 is supported.")] = 1
    logprobs: Annotated[Literal[False] | None, BeforeValidator(_json_boolean)] = None
    user: str | None = None

    @model_validator(mode="after")
    def _stop_count(self) -> _OpenAIRequest:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 strings")
        if self.stop == "":
            raise ValueError("stop must not be empty")
        return self

    def sampling(self) -> SamplingParams:
        """The engine's view of these options (OpenAI's default length is 16 for completions)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        limit = self.max_completion_tokens or self.max_tokens or self.default_max_tokens
        return SamplingParams(limit, self.temperature, self.top_p, self.seed, stop)

    default_max_tokens: ClassVar[int] = 128


class ChatMessage(InputModel):
    """One turn of the conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=100_000)]


class ChatCompletionRequest(_OpenAIRequest):
    """`POST /v1/chat/completions`."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "default", "messages": [{"role": "user", "content": "Say hi."}]}]
        },
    )

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]

    @model_validator(mode="after")
    def _ends_with_user(self) -> ChatCompletionRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return self

    def task_input(self) -> dict[str, Any]:
        """The input as stored: the messages."""
        return {"messages": [m.model_dump() for m in self.messages]}


class CompletionRequest(_OpenAIRequest):
    """`POST /v1/completions`: the prompt goes to the model as is (no chat template)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "default", "prompt": "Once upon a time"}]},
    )

    prompt: Annotated[str | list[str], Field(description="One prompt (a list of one is fine).")]
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default for completions

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("give one prompt; batches of prompts are not supported")
        if not self.text:
            raise ValueError("prompt must not be empty")
        return self

    @property
    def text(self) -> str:
        """The prompt as one string."""
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt

    def task_input(self) -> dict[str, Any]:
        """The input as stored."""
        return {"prompt": self.text}


class Usage(BaseModel):
    """Token counts, OpenAI's way."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    """A chat completion; `generation_id` is what to rate (`POST /v1/feedback`)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    """The version and its dtype; with `seed`, tells when an answer may change."""
    choices: list[ChatChoice]
    usage: Usage
    generation_id: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None


class TextCompletion(BaseModel):
    """A text completion; `generation_id` is what to rate."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage
    generation_id: int
