"""Responses kept for retries that carry the same Idempotency-Key."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class IdempotencyRecord(Base):
    """One Idempotency-Key of one API key: the request it named and, once done, its response."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("scope", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the caller's API key (the form api_keys stores), so keys never share records."""
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    """SHA-256 of method, path, query and body: a reused key with another request is refused."""
    status_code: Mapped[int | None] = mapped_column(Integer)
    """None while the first request is still being answered."""
    headers: Mapped[list[list[str]] | None] = mapped_column(JSON)
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The response body, encrypted with a key derived from the caller's API key: a reply may
    hold a secret (a created key) and neither the database nor its logs may show it."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
