"""What a running app holds, typed: made by the lifespan (app/main.py), read through app/deps.py.

One object in one slot of `app.state`, not the lifespan's state dict (Starlette's `yield
{...}`): that dict lives in the server's lifespan scope and is copied into each request, so
tests, a second TestClient on a started app and live uvicorn servers could not reach the engine
or the registry from the app, and the Idempotency-Key middleware reads it from the app too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette

from app.config import Settings
from app.engine.registry import ModelRegistry
from app.engine.scheduler import Engine
from app.services.hotswap import VersionFollower
from app.services.queue import TaskQueue
from app.services.ratelimit import RateLimits
from app.services.stats import StatsCache

_SLOT = "feedback_lm"
"""The one attribute of `app.state` this app sets."""


@dataclass(frozen=True)
class AppState:
    """The settings, the database, the model registry, the engine and the rest of a running app."""

    settings: Settings
    sessions: sessionmaker[Session]
    """The session factory: one session per request, or one of its own for a streamed answer."""
    registry: ModelRegistry
    engine: Engine
    follower: VersionFollower
    """What keeps this process on the active version, and loads others on request."""
    rate_limits: RateLimits
    stats_cache: StatsCache = field(default_factory=StatsCache)
    """This process's cache of statistics."""

    @cached_property
    def queue(self) -> TaskQueue:
        """The task queue, made on first use: most requests never need the broker."""
        return TaskQueue(self.settings)


def install_state(app: Starlette, state: AppState) -> None:
    """Make `state` what the app serves with (the lifespan; tests that swap a part)."""
    setattr(app.state, _SLOT, state)


def app_state(app: Starlette) -> AppState:
    """The state of a started app; RuntimeError before its lifespan has run."""
    state = getattr(app.state, _SLOT, None)
    if not isinstance(state, AppState):
        raise RuntimeError("the app has not started: its lifespan has not run")
    return state
