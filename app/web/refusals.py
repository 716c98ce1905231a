"""Refusals told again at once: a caller answered 429 with Retry-After on a route gets the same
answer on that route until that time has passed, before its body is read or its key looked up.

A key that ignores Retry-After and retries as fast as it can otherwise costs a full request's
work per refusal (body checks, parsing, authentication, the limiter); at about 100 refusals a
second that took most of a core from the model on a 2-core machine.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 4096
"""Largest refusal body kept to be told again (a 429's message is far shorter)."""


@dataclass
class _Refusal:
    until: float
    headers: list[tuple[bytes, bytes]]
    body: bytes


class RepeatRefusals:
    """Answers a caller's request with the 429 it got on the same route, while its Retry-After
    lasts. Callers are told apart by their Authorization header; requests without one, and
    requests with an Idempotency-Key (a retry may have a stored answer to replay), pass."""

    def __init__(self, app: ASGIApp, max_entries: int = 10_000) -> None:
        self.app = app
        self.max_entries = max_entries
        self._refusals: OrderedDict[tuple[bytes, str, str], _Refusal] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        auth = headers.get("authorization") if headers is not None else None
        if headers is None or not auth or "idempotency-key" in headers:
            await self.app(scope, receive, send)
            return
        caller = (hashlib.sha256(auth.encode()).digest(), scope["method"], scope["path"])
        now = time.monotonic()
        refusal = self._refusals.get(caller)
        if refusal is not None and refusal.until > now:
            await self._tell_again(refusal, now, send)
            return
        await self.app(scope, receive, self._watching(caller, send))

    def _watching(self, caller: tuple[bytes, str, str], send: Send) -> Send:
        """`send`, keeping a 429 with Retry-After to tell again."""
        kept: _Refusal | None = None

        async def watching(message: Message) -> None:
            nonlocal kept
            if message["type"] == "http.response.start" and message["status"] == 429:
                retry_after = Headers(raw=message["headers"]).get("retry-after", "")
                if retry_after.isdigit() and int(retry_after) > 0:
                    until = time.monotonic() + int(retry_after)
                    kept = _Refusal(until, list(message["headers"]), b"")
            elif message["type"] == "http.response.body" and kept is not None:
                kept.body += message.get("body", b"")
                if len(kept.body) > MAX_BODY:
                    kept = None
                elif not message.get("more_body", False):
                    self._keep(caller, kept)
            await send(message)

        return watching

    def _keep(self, caller: tuple[bytes, str, str], refusal: _Refusal) -> None:
        self._refusals.pop(caller, None)
        self._refusals[caller] = refusal
        if len(self._refusals) > self.max_entries:
            now = time.monotonic()
            for key in [k for k, r in self._refusals.items() if r.until <= now]:
                del self._refusals[key]
            while len(self._refusals) > self.max_entries:
                self._refusals.popitem(last=False)

    @staticmethod
    async def _tell_again(refusal: _Refusal, now: float, send: Send) -> None:
        headers = MutableHeaders(raw=list(refusal.headers))
        headers["Retry-After"] = str(max(1, math.ceil(refusal.until - now)))
        await send({"type": "http.response.start", "status": 429, "headers": headers.raw})
        await send({"type": "http.response.body", "body": refusal.body})
