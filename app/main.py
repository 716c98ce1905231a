"""The app factory and its lifespan, which owns the database, the model registry and the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import OperationalError

from app.api import feedback, generation, health, keys, models, openai, stats, training
from app.config import Settings, load_settings
from app.db import make_engine, make_sessionmaker
from app.deps import RATE_LIMITED, GenerationLimit, ReadLimit
from app.engine.registry import ModelRegistry, NoModelLoaded
from app.engine.requests import EngineStopped
from app.engine.scheduler import Engine, EngineLimits
from app.migrate import is_current
from app.services.errors import (
    Busy,
    ClientGone,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    ServiceError,
    Unavailable,
)
from app.services.hotswap import VersionFollower, load_base_version
from app.services.keys import ensure_bootstrap_admin
from app.services.ratelimit import RateLimits
from app.state import AppState, install_state
from app.web import pages
from app.web.idempotency import IdempotencyMiddleware
from app.web.limits import BodyLimit, JsonBodyCheck
from app.web.refusals import RepeatRefusals

log = logging.getLogger("app")


class StartupError(RuntimeError):
    """The service cannot start; the message says what to do."""


def engine_limits(settings: Settings) -> EngineLimits:
    """The engine's limits from the settings."""
    return EngineLimits(
        max_waiting=settings.max_waiting_requests,
        max_batch=settings.max_batch_size,
        max_prompt_tokens=settings.max_prompt_tokens,
        kv_cache_bytes=settings.kv_cache_bytes,
        max_per_owner=settings.max_requests_per_key,
        kv_share_per_owner=settings.kv_cache_key_share,
        prefill_chunk=settings.prefill_chunk_tokens,
    )


@asynccontextmanager
async def lifespan(
    app: FastAPI, *, settings: Settings, rate_limits: RateLimits
) -> AsyncIterator[None]:
    """Open the database, check its schema, make sure an admin key exists and load the model."""
    db_engine = make_engine(settings.sqlalchemy_url)
    try:
        if not is_current(db_engine):
            raise StartupError(
                "the database schema is not up to date: run `python -m app.cli setup` first"
            )
        sessions = make_sessionmaker(db_engine)
        with sessions() as session:
            new_key = ensure_bootstrap_admin(
                session, configured=settings.admin_api_key, key_file=settings.admin_key_file
            )
        if new_key is not None:
            log.warning("created the admin API key (kept in %s)", settings.admin_key_file)
        registry = ModelRegistry()
        with sessions() as session:
            base = load_base_version(session, settings)
        registry.activate(base)
        follower = VersionFollower(sessions, settings=settings, registry=registry, base=base)
        follower.sync()  # a trained version may be the active one
        follower.start()
        engine = Engine(registry, limits=engine_limits(settings))
        engine.start()
        install_state(
            app,
            AppState(
                settings=settings, sessions=sessions, registry=registry, engine=engine,
                follower=follower, rate_limits=rate_limits,
            ),
        )  # fmt: skip
        # Sync routes run in AnyIO's thread pool (40 threads by default), and a generation holds
        # its thread until the answer is complete. At most max_waiting + max_batch of them can
        # be in the engine (beyond, 429), so this many more threads keep reads and ratings
        # answering while every generation slot is taken.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = settings.max_waiting_requests + settings.max_batch_size + 40
        log.info("serving model version %s", registry.active.name)
        yield
        engine.stop()
        follower.stop()
    finally:
        db_engine.dispose()


CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request whose client closed the connection first."""


def _error(status_code: int, detail: object) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


def _install_error_handlers(app: FastAPI) -> None:
    """Map service errors to clear 4xx answers, and outages to 503 instead of 500."""

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, InvalidInput):
            detail = [{"loc": [exc.location, exc.field], "msg": exc.message, "type": "value_error"}]
            return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)
        if isinstance(exc, Forbidden):
            return _error(status.HTTP_403_FORBIDDEN, exc.message)
        if isinstance(exc, NotFound):
            return _error(status.HTTP_404_NOT_FOUND, exc.message)
        if isinstance(exc, Conflict):
            return _error(status.HTTP_409_CONFLICT, exc.message)
        if isinstance(exc, ClientGone):
            return _error(CLIENT_CLOSED_REQUEST, exc.message)
        if isinstance(exc, Busy):
            response = _error(status.HTTP_429_TOO_MANY_REQUESTS, exc.message)
            response.headers["Retry-After"] = "1"
            return response
        if isinstance(exc, Unavailable):
            response = _error(status.HTTP_503_SERVICE_UNAVAILABLE, exc.message)
            response.headers["Retry-After"] = "10"
            return response
        return _error(status.HTTP_400_BAD_REQUEST, exc.message)

    @app.exception_handler(NoModelLoaded)
    @app.exception_handler(EngineStopped)
    async def no_model(_: Request, exc: Exception) -> JSONResponse:
        response = _error(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(OperationalError)
    async def database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database unavailable: %s", type(exc.orig).__name__)
        response = _error(status.HTTP_503_SERVICE_UNAVAILABLE, "the database is unavailable; retry")
        response.headers["Retry-After"] = "5"
        return response


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI app; settings default to the environment."""
    settings = settings or load_settings()
    rate_limits = RateLimits.from_settings(settings)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = FastAPIOffline(
        title="feedback-lm",
        summary="A language model service that improves from human feedback.",
        version="0.1.0",
        lifespan=partial(lifespan, settings=settings, rate_limits=rate_limits),
    )
    _install_error_handlers(app)
    app.include_router(health.router)
    for module in (generation, openai, feedback, models, training, keys, stats):
        if module is openai:  # both its routes generate
            app.include_router(
                module.router, dependencies=[GenerationLimit], responses=RATE_LIMITED
            )
        else:  # every GET under /v1 counts against RATE_LIMIT_READ
            app.include_router(module.router, dependencies=[ReadLimit])
    app.add_middleware(IdempotencyMiddleware)
    # Outside it: a malformed or too deeply nested JSON body is a 422 before it is parsed again.
    app.add_middleware(JsonBodyCheck)
    # Added last, so it wraps the idempotency middleware, which reads bodies too.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    pages.install(app)
    # Outermost: a refusal told again costs nothing of what is inside (see app/web/refusals.py).
    app.add_middleware(RepeatRefusals)
    return app
