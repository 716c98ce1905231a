"""OpenAI-compatible endpoints: chat completions and completions, streamed or not.

What they generate is recorded like every other generation; `generation_id` in the response (in
the last chunk when streaming) is what to rate.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from app.api.streaming import documented_stream, event_stream, sse
from app.deps import Generating, GeneratingDep
from app.ml.engine import Completion, GenerationStream
from app.ml.registry import ServingVersion
from app.models import ApiKey, Role, Task
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
from app.services.serving import VersionFollower


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


def _lease(
    body: ChatCompletionRequest | CompletionRequest,
    key: ApiKey,
    session: Session,
    follower: VersionFollower,
) -> AbstractContextManager[ServingVersion] | None:
    """The version `model` names: None (the active one) for `default` or the active name."""
    if body.model in ("default", follower.registry.active.name):
        return None
    if key.role is not Role.admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"model {body.model!r}: only admins choose a version other than the active one; "
            "use 'default'",
        )
    return follower.lease_by_name(session, body.model)


def _usage(completion: Completion) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


Chunk = Callable[[dict[str, Any], str | None], dict[str, Any]]
"""Makes one SSE payload from a delta and a finish reason, in the endpoint's shape."""


def _stream(
    stream: GenerationStream,
    record: Callable[[Completion], int],
    chunk: Chunk,
) -> StreamingResponse:
    """OpenAI's events: text deltas, a last chunk with finish_reason, usage and
    generation_id, then `[DONE]`; a failure mid-stream sends OpenAI's error object."""

    def done(completion: Completion, row_id: int) -> list[str]:
        last = chunk({}, completion.finish_reason)
        usage = _usage(completion).model_dump()
        return [sse({**last, "usage": usage, "generation_id": row_id}), sse("[DONE]")]

    return event_stream(
        stream, record,
        opening=[sse(chunk({"role": "assistant", "content": ""}, None))],
        delta=lambda text: sse(chunk({"content": text}, None)),
        done=done,
        error=lambda message: sse({"error": {"message": message, "type": "server_error"}}),
    )  # fmt: skip


@dataclass(frozen=True)
class _Started:
    """A queued OpenAI request: its stream, how to record it, and the fields every reply has."""

    stream: GenerationStream
    record: Callable[[Completion], int]
    created: int
    model: str
    fingerprint: str


def _start(
    task: Task, body: ChatCompletionRequest | CompletionRequest, ctx: Generating
) -> _Started:
    """Queue the request on the version `model` names and release the database connection."""
    data, params = body.task_input(), body.sampling()
    stream, prompt = generations.start_generation(
        ctx.engine, task=task, data=data, params=params, max_chars=ctx.settings.max_prompt_chars,
        version_lease=_lease(body, ctx.key, ctx.session, ctx.follower), owner=ctx.key.id,
    )  # fmt: skip
    generations.release_connection(ctx.session)  # a stream can outlive the pool's patience
    record = generations.recorder(
        ctx.sessions, lambda row: row.id,
        api_key_id=ctx.key.id, task=task, data=data, prompt=prompt, params=params,
    )  # fmt: skip
    version = stream.version
    return _Started(stream, record, int(time.time()), version.name, version.fingerprint)


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAM_DOC)
def chat_completions(body: ChatCompletionRequest, ctx: GeneratingDep) -> Any:
    """OpenAI's chat completions: the conversation through the model's chat template."""
    run = _start(Task.chat, body, ctx)
    if body.stream:
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": chunk_id, "object": "chat.completion.chunk", "created": run.created,
                "model": run.model, "system_fingerprint": run.fingerprint,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }  # fmt: skip

        return _stream(run.stream, run.record, chunk)
    completion = generations.wait_for(run.stream, disconnected=ctx.disconnected)
    row_id = run.record(completion)
    if completion.finish_reason == "cancelled":
        raise generations.gone(row_id)
    return ChatCompletion(
        id=f"chatcmpl-{row_id}", created=run.created, model=run.model, generation_id=row_id,
        system_fingerprint=run.fingerprint,
        choices=[ChatChoice(
            message=ChatChoiceMessage(content=completion.text),
            finish_reason=completion.finish_reason,
        )],
        usage=_usage(completion),
    )  # fmt: skip


@router.post("/completions", response_model=TextCompletion, responses=STREAM_DOC)
def completions(body: CompletionRequest, ctx: GeneratingDep) -> Any:
    """OpenAI's (legacy) completions: the prompt goes to the model as is."""
    run = _start(Task.completion, body, ctx)
    if body.stream:
        chunk_id = f"cmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": chunk_id, "object": "text_completion", "created": run.created,
                "model": run.model, "system_fingerprint": run.fingerprint,
                "choices": [{
                    "index": 0, "text": delta.get("content", ""), "finish_reason": finish,
                    "logprobs": None,
                }],
            }  # fmt: skip

        return _stream(run.stream, run.record, chunk)
    completion = generations.wait_for(run.stream, disconnected=ctx.disconnected)
    row_id = run.record(completion)
    if completion.finish_reason == "cancelled":
        raise generations.gone(row_id)
    return TextCompletion(
        id=f"cmpl-{row_id}", created=run.created, model=run.model, generation_id=row_id,
        system_fingerprint=run.fingerprint,
        choices=[CompletionChoice(text=completion.text, finish_reason=completion.finish_reason)],
        usage=_usage(completion),
    )  # fmt: skip
