"""API keys: creation, authentication, revocation and the bootstrap admin key."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ApiKey, Role
from app.services.errors import Conflict, NotFound

KEY_PREFIX = "flm_"


def hash_key(plaintext: str) -> str:
    """SHA-256 of a key, the only form stored."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_plaintext_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(
    session: Session, *, name: str, role: Role, plaintext: str | None = None
) -> tuple[ApiKey, str]:
    """Store a new key and return it with its plaintext, which is never stored."""
    plaintext = plaintext or new_plaintext_key()
    key = ApiKey(name=name, role=role, key_hash=hash_key(plaintext), prefix=plaintext[:8])
    session.add(key)
    session.commit()
    return key, plaintext


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The active key with this plaintext, or None."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))
    if key is None or key.revoked_at is not None:
        return None
    return key


def visible_owner(key: ApiKey) -> int | None:
    """Whose generations `key` may read and rate: its own id for a user key, None (everyone's)
    for rater and admin keys."""
    return None if key.role.sees_all else key.id


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


LAST_ADMIN = "this is the last active admin key; create another admin key first"


def _active_admin_ids(session: Session, *, lock: bool = False) -> list[int]:
    query = (
        select(ApiKey.id)
        .where(ApiKey.role == Role.admin, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.id)
    )
    return list(session.scalars(query.with_for_update() if lock else query))


def revoke_key(session: Session, key_id: int) -> ApiKey:
    """Revoke a key; the last active admin key cannot be revoked (nobody could manage keys)."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"API key {key_id} does not exist")
    if key.revoked_at is not None:
        return key
    # Two admins revoking each other at the same moment must not both succeed. PostgreSQL: lock
    # the active admin keys (in id order, so no deadlock) before deciding. SQLite has no row locks
    # but one writer at a time: count again once this revocation is written and holds the lock.
    if key.role is Role.admin:
        active = _active_admin_ids(session, lock=True)
        if key.id not in active:  # revoked meanwhile
            session.rollback()
            return key
        if len(active) == 1:
            session.rollback()
            raise Conflict(LAST_ADMIN)
    key.revoked_at = utcnow()
    if key.role is Role.admin:
        session.flush()
        if not _active_admin_ids(session):
            session.rollback()
            raise Conflict(LAST_ADMIN)
    session.commit()
    return key


def ensure_bootstrap_admin(
    session: Session, *, configured: str | None, key_file: Path
) -> str | None:
    """Make sure an admin key exists; return a newly generated plaintext (to print once), else None.

    A configured key (ADMIN_API_KEY) is registered if missing. Otherwise the first start generates
    one and keeps it in `key_file`, readable by the owner only.
    """
    if configured is not None:
        if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(configured))) is None:
            try:
                create_key(session, name="bootstrap admin", role=Role.admin, plaintext=configured)
            except IntegrityError:  # another process registered it first
                session.rollback()
        return None
    if key_file.is_file():
        stored = key_file.read_text().strip()
        if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(stored))) is None:
            create_key(session, name="bootstrap admin", role=Role.admin, plaintext=stored)
        return None
    has_admin = session.scalar(
        select(func.count()).where(ApiKey.role == Role.admin, ApiKey.revoked_at.is_(None))
    )
    if has_admin:
        return None
    _, plaintext = create_key(session, name="bootstrap admin", role=Role.admin)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(plaintext + "\n")
    return plaintext
