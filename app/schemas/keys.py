"""API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.models import Role
from app.schemas.common import NonBlank, StrictModel


class KeyCreate(StrictModel):
    """A new key."""

    name: Annotated[NonBlank, Field(max_length=100, examples=["rater-alice"])]
    role: Role = Role.user


class KeyPublic(BaseModel):
    """A key as listed: never its secret."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    prefix: str = Field(description="The key's first characters, to recognise it.")
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    """A key just created: the only time its secret is shown."""

    key: str
