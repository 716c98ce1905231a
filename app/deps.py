"""Typed dependencies the routers declare."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.engine.registry import ModelRegistry
from app.engine.scheduler import Engine
from app.models import ApiKey, Role
from app.services import keys
from app.services.hotswap import VersionFollower
from app.services.queue import TaskQueue
from app.services.stats import StatsCache
from app.state import AppState, app_state

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def get_state(request: Request) -> AppState:
    """What the running app holds (app/state.py)."""
    return app_state(request.app)


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    """The app's Settings."""
    return state.settings


def get_sessions(state: StateDep) -> sessionmaker[Session]:
    """The session factory, for work that outlives the request's session (a streamed body)."""
    return state.sessions


def get_session(state: StateDep) -> Iterator[Session]:
    """A database session for one request."""
    with state.sessions() as session:
        yield session


def get_engine(state: StateDep) -> Engine:
    """The generation engine."""
    return state.engine


def get_registry(state: StateDep) -> ModelRegistry:
    """The model versions this process holds."""
    return state.registry


def get_follower(state: StateDep) -> VersionFollower:
    """What keeps this process on the active version, and loads others on request."""
    return state.follower


def get_stats_cache(state: StateDep) -> StatsCache:
    """This process's cache of statistics."""
    return state.stats_cache


def get_queue(state: StateDep) -> TaskQueue:
    """The task queue (made on first use: most requests never need the broker)."""
    return state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
StatsCacheDep = Annotated[StatsCache, Depends(get_stats_cache)]
FollowerDep = Annotated[VersionFollower, Depends(get_follower)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]
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


@dataclass(frozen=True)
class Generating:
    """What a generation route works with: the caller, its session, the engine and the rest."""

    key: ApiKey
    session: Session
    engine: Engine
    settings: Settings
    follower: VersionFollower
    sessions: Callable[[], Session]
    """The session factory, for recording a streamed answer after the request's session."""
    disconnected: Callable[[], bool]
    """Whether the client has gone away (callable from the route's worker thread)."""


def generating(
    key: CurrentKey,
    session: SessionDep,
    engine: EngineDep,
    settings: SettingsDep,
    follower: FollowerDep,
    sessions: SessionsDep,
    request: Request,
) -> Generating:
    """The pieces a generation route needs, as one dependency."""

    def disconnected() -> bool:
        return bool(anyio.from_thread.run(request.is_disconnected))

    return Generating(key, session, engine, settings, follower, sessions, disconnected)


GeneratingDep = Annotated[Generating, Depends(generating)]


def admin_key(key: CurrentKey) -> ApiKey:
    """The caller's key when it is an admin key, else 403."""
    if key.role is not Role.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this action needs an admin key")
    return key


AdminKey = Annotated[ApiKey, Depends(admin_key)]


def _count(state: AppState, kind: str, key: ApiKey) -> None:
    refusal = state.rate_limits.hit(kind, key.key_hash)
    if refusal is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            refusal.message,
            headers={"Retry-After": str(refusal.retry_after)},
        )


def generation_limit(key: CurrentKey, state: StateDep) -> None:
    """Count a generation against the caller's rate limit; 429 with Retry-After beyond it."""
    _count(state, "generation", key)


def feedback_limit(key: CurrentKey, state: StateDep) -> None:
    """Count a rating or comparison against the caller's rate limit; 429 beyond it."""
    _count(state, "feedback", key)


def read_limit(key: CurrentKey, state: StateDep, request: Request) -> None:
    """Count a read (any GET) against the caller's rate limit; 429 beyond it. Other methods
    pass: they count against their own limits."""
    if request.method == "GET":
        _count(state, "read", key)


GenerationLimit = Depends(generation_limit)
FeedbackLimit = Depends(feedback_limit)
ReadLimit = Depends(read_limit)
"""On every /v1 router: each GET it serves counts against RATE_LIMIT_READ."""
RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {
        "description": "Too many requests: over the API key's rate limit, or the model's queue "
        "is full. `detail` says which, `Retry-After` in how many seconds to retry."
    }
}
