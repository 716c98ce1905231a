"""`Idempotency-Key` on every POST under /v1: a retry gets the stored answer, not a second run.

The caller's API key is checked first: an unknown or revoked key gets the same 401 as the route
would give, before anything is written or any stored answer is replayed (a revoked key never gets
a replay). Only successful (2xx) answers are kept: after an error nothing was done, and the same
key may be sent again. Streamed requests (`stream: true`) are refused with the header, since a
stream cannot be replayed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import TypeVar

import anyio
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.services.idempotency import (
    Caller,
    IdempotencyStore,
    StoredResponse,
    Verdict,
    fingerprint,
)
from app.services.keys import authenticate
from app.state import app_state
from app.web.limits import read_body, replaying

log = logging.getLogger(__name__)
T = TypeVar("T")

HEADER = "idempotency-key"
VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")
BAD_KEY = "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces (a UUID)"
MISMATCH = (
    "this Idempotency-Key was already used for a different request; use a new key for a new "
    "request, or resend exactly the same one"
)
IN_FLIGHT = "the request with this Idempotency-Key is still being answered; retry in a moment"
STREAMED = (
    "Idempotency-Key is not supported with stream: true (a stream cannot be replayed); "
    "leave out the header or set stream to false"
)
DATABASE_DOWN = "the database is unavailable; retry"
UNKNOWN_KEY = "unknown or revoked API key"


class IdempotencyMiddleware:
    """Claims the key, runs the request, keeps a 2xx answer; replays it for a retry."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._store: IdempotencyStore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else Headers()
        scheme, token = get_authorization_scheme_param(headers.get("authorization"))
        applies = (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith("/v1/")
            and HEADER in headers
            and scheme.lower() == "bearer"  # without a key the route answers 401
            and token != ""
        )
        if not applies:
            await self.app(scope, receive, send)
            return
        try:
            known = await _in_thread(lambda: self._known(scope, token))
        except SQLAlchemyError as exc:
            log.error("API keys unavailable: %s", type(exc).__name__)
            await _error(503, DATABASE_DOWN, retry_after=5)(scope, receive, send)
            return
        if not known:
            response = _error(401, UNKNOWN_KEY)
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        key = headers[HEADER]
        if not VALID_KEY.fullmatch(key):
            await _error(422, BAD_KEY)(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client left
            return
        if _streams(body):
            await _error(422, STREAMED)(scope, receive, send)
            return
        caller = Caller.of(token)
        store = self._store_of(scope)
        request = fingerprint(
            "POST", path=scope["path"], query=scope.get("query_string", b""), body=body
        )
        try:
            begun = await _in_thread(
                lambda: store.begin(caller, key=key, request_fingerprint=request)
            )
        except SQLAlchemyError as exc:
            log.error("idempotency records unavailable: %s", type(exc).__name__)
            await _error(503, DATABASE_DOWN, retry_after=5)(scope, receive, send)
            return
        if begun.verdict is Verdict.replay:
            assert begun.response is not None
            await _replay(begun.response, send)
        elif begun.verdict is Verdict.mismatch:
            await _error(422, MISMATCH)(scope, receive, send)
        elif begun.verdict is Verdict.in_flight:
            await _error(409, IN_FLIGHT, retry_after=1)(scope, receive, send)
        else:
            assert begun.record_id is not None
            await self._run(scope, replaying(body, receive), send, caller, begun.record_id)

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, caller: Caller, record_id: int
    ) -> None:
        """Run the claimed request; its answer is kept before it is sent, so that a client that
        got it and retries is sure to get it again."""
        store = self._store_of(scope)
        messages: list[Message] = []

        async def buffer(message: Message) -> None:
            messages.append(message)

        try:
            await self.app(scope, receive, buffer)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _quietly(lambda: store.release(record_id))
            raise
        response = _collect(messages)
        if response is not None and 200 <= response.status_code < 300:
            await _quietly(lambda: store.complete(caller, record_id=record_id, response=response))
        else:
            await _quietly(lambda: store.release(record_id))
        for message in messages:
            await send(message)

    @staticmethod
    def _known(scope: Scope, token: str) -> bool:
        """Whether `token` is an active API key."""
        with app_state(scope["app"]).sessions() as session:
            return authenticate(session, token) is not None

    def _store_of(self, scope: Scope) -> IdempotencyStore:
        if self._store is None:
            self._store = IdempotencyStore(app_state(scope["app"]).sessions)
        return self._store


async def _in_thread(call: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(call)


async def _quietly(call: Callable[[], None]) -> None:
    """Update a record after the work is done: the answer goes out even if the database has
    gone; the record then waits out ABANDONED_AFTER before its key can run again."""
    try:
        await _in_thread(call)
    except SQLAlchemyError as exc:
        log.warning("could not update an Idempotency-Key record: %s", type(exc).__name__)


def _streams(body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return False  # the route explains what is wrong with it
    return isinstance(parsed, dict) and parsed.get("stream") is True


def _collect(messages: list[Message]) -> StoredResponse | None:
    """The whole response, or None if the app did not finish one."""
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    if start is None or not bodies or bodies[-1].get("more_body", False):
        return None
    headers = [
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in start["headers"]
    ]
    return StoredResponse(start["status"], headers, b"".join(m.get("body", b"") for m in bodies))


async def _replay(response: StoredResponse, send: Send) -> None:
    headers = [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers
    ]
    headers.append((b"idempotent-replayed", b"true"))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def _error(status_code: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": message}, status_code=status_code, headers=headers)
