"""API keys: managed by admins; any key can ask who it is."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from app.deps import RATE_LIMITED, AdminKey, CurrentKey, SessionDep
from app.schemas.keys import KeyCreate, KeyCreated, KeyPublic
from app.services import keys

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_key(body: KeyCreate, _: AdminKey, session: SessionDep) -> KeyCreated:
    """Create a key; its secret is in this response only."""
    row, plaintext = keys.create_key(session, name=body.name, role=body.role)
    return KeyCreated(**KeyPublic.model_validate(row).model_dump(), key=plaintext)


@router.get("/me", response_model=KeyPublic, responses=RATE_LIMITED)
def who_am_i(key: CurrentKey) -> KeyPublic:
    """The calling key: its name and role (the browser pages sign in with this)."""
    return KeyPublic.model_validate(key)


@router.get("", response_model=list[KeyPublic], responses=RATE_LIMITED)
def list_keys(_: AdminKey, session: SessionDep) -> list[KeyPublic]:
    """Every key, without secrets."""
    return [KeyPublic.model_validate(row) for row in keys.list_keys(session)]


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_key(
    key_id: Annotated[int, Path(ge=1, le=2**31 - 1)], _: AdminKey, session: SessionDep
) -> None:
    """Revoke a key: it stops working at once; what it did stays recorded."""
    keys.revoke_key(session, key_id)
