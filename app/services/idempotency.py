"""Idempotency keys: a write retried with the same key gets the first answer, not a second run.

Records are scoped to the caller's API key (by its SHA-256, as api_keys stores it), kept for 24
hours, and hold the response encrypted with a key derived from the caller's API key, which the
service never stores: a kept reply may hold a secret (a newly created API key).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.fernet import Fernet
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.models import IdempotencyRecord
from app.services.keys import hash_key

TTL = timedelta(hours=24)
# A record still unanswered after this long lost its process (a crash): the key may be reused.
ABANDONED_AFTER = timedelta(minutes=15)
PURGE_EVERY = 600.0
"""Seconds between deletions of expired records (lookups ignore them anyway)."""


@dataclass(frozen=True)
class Caller:
    """Who sent an Idempotency-Key: the scope of their records and the cipher of their replies."""

    scope: str
    cipher: Fernet

    @classmethod
    def of(cls, api_key: str) -> Caller:
        """The caller behind a plaintext API key (the middleware has checked that it is one)."""
        secret = hashlib.sha256(b"feedback-lm idempotent replies\0" + api_key.encode()).digest()
        return cls(hash_key(api_key), Fernet(base64.urlsafe_b64encode(secret)))


@dataclass(frozen=True)
class StoredResponse:
    """A response as it was sent."""

    status_code: int
    headers: list[tuple[str, str]]
    body: bytes


class Verdict(enum.Enum):
    """What to do with a request that carries an Idempotency-Key."""

    claimed = "claimed"
    """The first with this key: run it, then `complete` or `release` the record."""
    replay = "replay"
    """Answered before: send the stored response."""
    mismatch = "mismatch"
    """The key was used for a different request."""
    in_flight = "in_flight"
    """The first request with this key is still being answered."""


@dataclass(frozen=True)
class Begun:
    """The verdict, with the claimed record's id or the stored response."""

    verdict: Verdict
    record_id: int | None = None
    response: StoredResponse | None = None


def fingerprint(method: str, *, path: str, query: bytes, body: bytes) -> str:
    """SHA-256 of what makes two requests the same request."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


class IdempotencyStore:
    """Idempotency records in the database; each call is its own short transaction."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._next_purge = 0.0

    def begin(self, caller: Caller, *, key: str, request_fingerprint: str) -> Begun:
        """Claim `key` for this request, or say why not."""
        now = utcnow()
        with self._sessions() as session:
            self._purge_now_and_then(session, now)
            row = _find(session, caller.scope, key)
            if row is not None and _stale(row, now):
                session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id == row.id))
                session.commit()
                row = None
            if row is None:
                claim = IdempotencyRecord(
                    scope=caller.scope, key=key, fingerprint=request_fingerprint,
                    created_at=now, expires_at=now + TTL,
                )  # fmt: skip
                session.add(claim)
                try:
                    session.commit()
                    return Begun(Verdict.claimed, record_id=claim.id)
                except IntegrityError:  # a concurrent request with the same key claimed it
                    session.rollback()
                    row = _find(session, caller.scope, key)
                    if row is None:  # and it was released already
                        return Begun(Verdict.in_flight)
            if row.fingerprint != request_fingerprint:
                return Begun(Verdict.mismatch)
            if row.status_code is None:
                return Begun(Verdict.in_flight)
            headers = [(name, value) for name, value in row.headers or []]
            body = caller.cipher.decrypt(row.body) if row.body else b""
            return Begun(Verdict.replay, response=StoredResponse(row.status_code, headers, body))

    def complete(self, caller: Caller, *, record_id: int, response: StoredResponse) -> None:
        """Keep the response of a claimed request for its retries."""
        with self._sessions() as session:
            session.execute(
                update(IdempotencyRecord)
                .where(IdempotencyRecord.id == record_id)
                .values(
                    status_code=response.status_code,
                    headers=[list(header) for header in response.headers],
                    body=caller.cipher.encrypt(response.body),
                )
            )
            session.commit()

    def release(self, record_id: int) -> None:
        """Forget a claimed request that did not succeed, so that a retry runs it again."""
        with self._sessions() as session:
            session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.id == record_id, IdempotencyRecord.status_code.is_(None)
                )
            )
            session.commit()

    def _purge_now_and_then(self, session: Session, now: datetime) -> None:
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + PURGE_EVERY
        session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= now))
        session.commit()


def _find(session: Session, scope: str, key: str) -> IdempotencyRecord | None:
    query = select(IdempotencyRecord).where(
        IdempotencyRecord.scope == scope, IdempotencyRecord.key == key
    )
    return session.scalar(query)


def _stale(row: IdempotencyRecord, now: datetime) -> bool:
    abandoned = row.status_code is None and row.created_at <= now - ABANDONED_AFTER
    return row.expires_at <= now or abandoned
