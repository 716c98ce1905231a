"""Typed dependencies the routers declare."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.ml.engine import Engine
from app.models import ApiKey, Role
from app.services import keys
from app.services.serving import VersionFollower

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def get_settings(request: Request) -> Settings:
    """The app's Settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """A database session for one request."""
    with request.app.state.sessionmaker() as session:
        yield session


def get_engine(request: Request) -> Engine:
    """The generation engine."""
    engine: Engine = request.app.state.engine
    return engine


def get_follower(request: Request) -> VersionFollower:
    """What keeps this process on the active version, and loads others on request."""
    follower: VersionFollower = request.app.state.follower
    return follower


SettingsDep = Annotated[Settings, Depends(get_settings)]
FollowerDep = Annotated[VersionFollower, Depends(get_follower)]
SessionDep = Annotated[Session, Depends(get_session)]
EngineDep = Annotated[Engine, Depends(get_engine)]


def current_key(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The caller's active API key, else 401."""
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = keys.authenticate(session, credentials.credentials)
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "unknown or revoked API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]


def admin_key(key: CurrentKey) -> ApiKey:
    """The caller's key when it is an admin key, else 403."""
    if key.role is not Role.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this action needs an admin key")
    return key


AdminKey = Annotated[ApiKey, Depends(admin_key)]
