"""Request body limits: the size, enforced on the declared length and on what actually arrives,
and the shape of a JSON body (well-formed, and not nested beyond MAX_JSON_DEPTH)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the limit.

    An HTTPException, because FastAPI passes those on from body parsing to the app's handler
    (anything else there becomes a 400); BodyLimit answers any that reach it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is over the limit of {limit} bytes; send a smaller one"
        )


class BodyLimit:
    """Refuses bodies over `max_bytes` with 413: by Content-Length before reading anything, and
    while reading a body sent without one (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = whole = False

        async def limited_receive() -> Message:
            nonlocal received, whole
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                whole = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send, unread=not whole)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, unread: bool = True
    ) -> None:
        # Read (and drop) what the client is still sending, up to DRAIN_FACTOR x the limit,
        # before answering: a connection closed with the body unread is reset, and a proxy that
        # is still writing the body to it then answers 502 instead of this 413. (Once the body
        # is whole, receive() would wait for the client to go.)
        drained, more = 0, unread
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):  # a client that declares and stalls
                while more and drained <= DRAIN_FACTOR * self.max_bytes:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    drained += len(message.get("body", b""))
                    more = bool(message.get("more_body", False))
        error = BodyTooLarge(self.max_bytes)
        response = JSONResponse({"detail": error.detail}, status_code=error.status_code)
        await response(scope, receive, send)


DRAIN_FACTOR = 4
"""A refused body is read and dropped up to this many times the limit before the 413 is sent."""
DRAIN_SECONDS = 5.0
"""Longest a refused body is read for before the 413 is sent."""


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a JSON body. No request of this API needs more
than a few levels; far deeper ones (10,000 nested arrays) would exhaust the parser's recursion or
the error report's, which would be a 500."""


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar is 0); counting stops
    just past `limit`. Iterative, so any depth is safe to measure."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a string in the parsed value holds a lone UTF-16 surrogate (iteratively)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class _NotJson(ValueError):
    """What Python's parser accepts but JSON does not have (NaN, Infinity, 1e999)."""


def _constant(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the number {text[:40]} is out of range")
    return value


def json_body_problem(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """What is wrong with a JSON request body, or None when it is well-formed and shallow enough.

    Also refused: NaN and infinities, which Python's parser takes but JSON has not, and escapes of
    lone UTF-16 surrogates ("\\ud800", not a character): no database or tokenizer takes them,
    and an error report that echoed one could not be written (each was a 500)."""
    try:
        parsed = json.loads(body, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        return f"the JSON body is nested too deeply; at most {max_depth} levels are accepted"
    except UnicodeDecodeError:
        return "the body is not valid UTF-8 JSON"
    except _NotJson as exc:
        return f"the body is not valid JSON: {exc}"
    except json.JSONDecodeError as exc:
        return f"the body is not valid JSON: {exc}"
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        return f"the body is not acceptable JSON: {exc}"
    if json_depth(parsed, max_depth) > max_depth:
        return f"the JSON body is nested too deeply; at most {max_depth} levels are accepted"
    # Only an escape can make a lone surrogate (UTF-8 cannot encode one): look when there is one.
    if _SURROGATE_ESCAPE.search(body) and _holds_lone_surrogate(parsed):
        return "the body is not valid JSON text: it holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
    return None


class JsonBodyCheck:
    """Answers a malformed or too deeply nested JSON body with a 422 that says what is wrong,
    before any middleware or route parses it (Python's parser, and FastAPI's report of a
    validation error, recurse: very deep nesting was a 500)."""

    def __init__(self, app: ASGIApp, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        content_type = Headers(scope=scope).get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        # FastAPI reads a body as JSON when it says so, or says nothing.
        if media and media != "application/json" and not media.endswith("+json"):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client went away
            return
        problem = json_body_problem(body, self.max_depth) if body.strip() else None
        if problem is not None:
            detail = [{"loc": ["body"], "msg": problem, "type": "json_invalid"}]
            await JSONResponse({"detail": detail}, status_code=422)(scope, receive, send)
            return
        await self.app(scope, replaying(body, receive), send)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then waits on the client."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
