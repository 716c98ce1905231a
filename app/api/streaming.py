"""Server-sent events for a generation: the deltas as they come, then how it ended.

Shared by the native endpoints (`stream: true` on /v1/generate, /v1/translate, /v1/qa) and the
OpenAI-compatible ones, which differ only in the shape of each event.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
from fastapi.responses import StreamingResponse

from app.engine.requests import Completion, GenerationStream

Recorded = TypeVar("Recorded")
log = logging.getLogger(__name__)


def documented_stream(example: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entry: with `stream: true`, a 200 is server-sent events."""
    return {
        200: {
            "content": {"text/event-stream": {"example": example}},
            "description": "The answer; with `stream: true`, server-sent events.",
        }
    }


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    """One server-sent event; `data` as JSON unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def event_stream(
    stream: GenerationStream,
    record: Callable[[Completion], Recorded],
    *,
    delta: Callable[[str], str],
    done: Callable[[Completion, Recorded], list[str]],
    error: Callable[[str], str],
    opening: list[str] | None = None,
) -> StreamingResponse:
    """Stream a queued generation: `opening`, a `delta` event per piece of text, then `done`
    with what `record` stored. A generation that fails ends with an `error` event; a client
    that goes away cancels it, and the partial answer is still recorded."""

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            for event in opening or []:
                yield event
            async for text in stream.deltas():
                yield delta(text)
            try:
                completion = stream.result()
            except Exception as exc:  # e.g. shutdown: the client learns why the stream ended
                finished = True
                log.warning("a streamed generation failed: %s", exc)
                yield error(str(exc) or type(exc).__name__)
                return
            recorded = await anyio.to_thread.run_sync(record, completion)
            finished = True
            for event in done(completion, recorded):
                yield event
        finally:
            if not finished:
                stream.cancel()
                # Recorded once the loop lets go of it, so even a cancelled answer is kept.
                keep = threading.Thread(target=_record_when_done, args=(stream, record))
                keep.daemon = True
                keep.start()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _record_when_done(stream: GenerationStream, record: Callable[[Completion], object]) -> None:
    try:
        record(stream.result())
    except Exception:  # a shutdown or a database outage: nothing left to tell the client
        log.exception("could not record a cancelled generation")
