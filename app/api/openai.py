"""OpenAI-compatible endpoints: chat completions and completions, streamed or not.

What they generate is recorded like every other generation; `generation_id` in the response (in
the last chunk when streaming) is what to rate.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from app.api.streaming import documented_stream, event_stream, sse
from app.deps import Generating, GeneratingDep
from app.engine.requests import Completion
from app.models import Generation, Task
from app.schemas.openai import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    TextCompletion,
    Usage,
)
from app.services import generations


class OpenAIErrorRoute(APIRoute):
    """Errors also carry OpenAI's `{"error": {"message", "type"}}`, which its clients display.

    The app's own handlers make the response (`detail`, status, headers); this adds the object.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                app_handler = next(
                    (
                        h for cls in type(exc).__mro__
                        if (h := request.app.exception_handlers.get(cls)) is not None
                    ),
                    None,
                )  # fmt: skip
                if app_handler is None:
                    raise
                response = await app_handler(request, exc)
                return _with_openai_error(response)

        return handler


def _with_openai_error(response: Response) -> Response:
    try:
        body = json.loads(bytes(response.body))
    except ValueError:
        return response
    detail = body.get("detail")
    if isinstance(detail, list):
        message = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
        )
    else:
        message = str(detail)
    kind = "invalid_request_error" if response.status_code < 500 else "server_error"
    body["error"] = {"message": message, "type": kind, "code": response.status_code}
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return JSONResponse(body, status_code=response.status_code, headers=headers)


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute)
STREAM_DOC = documented_stream('data: {"object": "chat.completion.chunk", ...}\n\n')


def _usage(answer: Completion | Generation) -> Usage:
    return Usage(
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        total_tokens=answer.prompt_tokens + answer.completion_tokens,
    )


Chunk = Callable[[dict[str, Any], str | None], dict[str, Any]]
"""Makes one SSE payload from a delta and a finish reason, in the endpoint's shape."""


def _stream(run: generations.StartedGeneration, chunk: Chunk) -> StreamingResponse:
    """OpenAI's events: text deltas, a last chunk with finish_reason, usage and
    generation_id, then `[DONE]`; a failure mid-stream sends OpenAI's error object."""

    def done(completion: Completion, row_id: int) -> list[str]:
        last = chunk({}, completion.finish_reason)
        usage = _usage(completion).model_dump()
        return [sse({**last, "usage": usage, "generation_id": row_id}), sse("[DONE]")]

    return event_stream(
        run.stream, lambda completion: run.record(completion, lambda row: row.id),
        opening=[sse(chunk({"role": "assistant", "content": ""}, None))],
        delta=lambda text: sse(chunk({"content": text}, None)),
        done=done,
        error=lambda message: sse({"error": {"message": message, "type": "server_error"}}),
    )  # fmt: skip


def _start(
    task: Task, body: ChatCompletionRequest | CompletionRequest, ctx: Generating
) -> generations.StartedGeneration:
    """Queue the request on the version `model` names."""
    return generations.start_generation(
        ctx.session, engine=ctx.engine, follower=ctx.follower, sessions=ctx.sessions,
        key=ctx.key, task=task, data=body.task_input(), params=body.sampling(),
        max_chars=ctx.settings.max_prompt_chars, model_version=body.model, version_field="model",
    )  # fmt: skip


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAM_DOC)
def chat_completions(body: ChatCompletionRequest, ctx: GeneratingDep) -> Any:
    """OpenAI's chat completions: the conversation through the model's chat template."""
    run = _start(Task.chat, body, ctx)
    created, model, fingerprint = int(time.time()), run.version.name, run.version.fingerprint
    if body.stream:
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": chunk_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": fingerprint,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }  # fmt: skip

        return _stream(run, chunk)

    def answer(row: Generation) -> ChatCompletion:
        return ChatCompletion(
            id=f"chatcmpl-{row.id}", created=created, model=model, generation_id=row.id,
            system_fingerprint=fingerprint,
            choices=[ChatChoice(
                message=ChatChoiceMessage(content=row.output), finish_reason=row.finish_reason,
            )],
            usage=_usage(row),
        )  # fmt: skip

    return run.wait(answer, disconnected=ctx.disconnected)


@router.post("/completions", response_model=TextCompletion, responses=STREAM_DOC)
def completions(body: CompletionRequest, ctx: GeneratingDep) -> Any:
    """OpenAI's (legacy) completions: the prompt goes to the model as is."""
    run = _start(Task.completion, body, ctx)
    created, model, fingerprint = int(time.time()), run.version.name, run.version.fingerprint
    if body.stream:
        chunk_id = f"cmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": chunk_id, "object": "text_completion", "created": created,
                "model": model, "system_fingerprint": fingerprint,
                "choices": [{
                    "index": 0, "text": delta.get("content", ""), "finish_reason": finish,
                    "logprobs": None,
                }],
            }  # fmt: skip

        return _stream(run, chunk)

    def answer(row: Generation) -> TextCompletion:
        return TextCompletion(
            id=f"cmpl-{row.id}", created=created, model=model, generation_id=row.id,
            system_fingerprint=fingerprint,
            choices=[CompletionChoice(text=row.output, finish_reason=row.finish_reason)],
            usage=_usage(row),
        )  # fmt: skip

    return run.wait(answer, disconnected=ctx.disconnected)
