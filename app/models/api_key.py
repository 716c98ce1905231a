"""API keys: stored hashed, each with a role."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Enum, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class Role(enum.StrEnum):
    """What a key may do and see.

    Users generate, and read and rate only their own generations; raters also read and rate
    everyone's (the shared queue); admins also manage keys, versions and training, and see the
    per-rater figures of training rounds. Stored as a string (not a native enum type), so adding
    a role needs no migration.
    """

    user = "user"
    rater = "rater"
    admin = "admin"

    @property
    def sees_all(self) -> bool:
        """Whether the role reads and rates every key's generations, not only its own."""
        return self is not Role.user


class ApiKey(Base):
    """An API key; only its SHA-256 is stored (keys are 256-bit random: no slow hash needed)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
