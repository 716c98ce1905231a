"""How a serving process follows the active version without a restart: the hot swap."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.engine.checkpoints import CorruptCheckpoint, verify_checkpoint
from app.engine.loading import base_model_dir
from app.engine.registry import ModelRegistry, ServingVersion
from app.engine.versions import (
    build_base_version,
    in_short_thread,
    load_adapter_version,
    spare_copy,
)
from app.models import ModelVersion, VersionKind, VersionStatus
from app.services.errors import Conflict
from app.services.notify import CHANNEL
from app.services.versions import (
    activate,
    active_version,
    base_of,
    ensure_base_version,
    get_by_name,
    refuse,
)

log = logging.getLogger(__name__)


def load_base_version(session: Session, settings: Settings) -> ServingVersion:
    """Register the configured base model as a version if needed, and load it."""
    path = base_model_dir(settings)
    base = base_of(session, ensure_base_version(session, base_model=settings.model, path=str(path)))
    return build_base_version(
        base.id, base.name, path, settings.model_dtype, settings.kv_cache_dtype
    )


class VersionFollower:
    """Keeps a process on the active version: polls the database, woken early by Redis messages.

    Loading happens on this background thread; the registry swaps a pointer, so requests in
    flight finish on the version they started with.
    """

    def __init__(
        self, sessions: sessionmaker[Session], *, settings: Settings, registry: ModelRegistry,
        base: ServingVersion,
    ) -> None:  # fmt: skip
        self.sessions = sessions
        self.settings = settings
        self.registry = registry
        self.base = base
        self._wake = threading.Event()
        self._syncing = threading.Lock()
        self._pinning = threading.Lock()
        self._pinned: ServingVersion | None = None  # a version loaded for comparisons only
        self.base_model_name = settings.model
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start following in background threads."""
        self._threads = [threading.Thread(target=self._poll, name="version-follower", daemon=True)]
        if self.settings.redis_url:
            self._threads.append(
                threading.Thread(target=self._listen, name="version-listener", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def wake(self) -> None:
        """Check for a new active version now rather than at the next poll."""
        self._wake.set()

    def sync(self) -> None:
        """Serve the active version now if it is not what this process serves."""
        with self._syncing:
            if self._follow():
                self.preallocate()  # after the swap, so that it does not delay it

    def _follow(self) -> bool:
        """Swap to the active version if needed; whether this process swapped."""
        started = time.perf_counter()
        with self.sessions() as session:
            row = active_version(session)
            if row is None or row.id == self.registry.active.id:
                return False
            if row.kind is VersionKind.base:
                if row.id != self.base.id:
                    log.warning(
                        "version %s is a different base model; restart to serve it", row.name
                    )
                    return False
                self.registry.activate(self.base)
            else:
                try:
                    if (loaded := self.registry.retired(row.id)) is not None:
                        # A rollback to a version still in memory; its files must still verify,
                        # so that every process, and this one after a restart, agrees.
                        verify_checkpoint(Path(row.path))
                        self.registry.activate(loaded)
                    else:
                        self.registry.activate(
                            in_short_thread(
                                lambda: load_adapter_version(
                                    row, self.base, self.registry.take_spare
                                )
                            )
                        )
                except (CorruptCheckpoint, OSError, ValueError) as exc:
                    self._refuse(session, row, str(exc))
                    return False
            log.info(
                "now serving model version %s (swapped in %.2f s)",
                row.name, time.perf_counter() - started,
            )  # fmt: skip
            return True

    @contextmanager
    def lease_by_name(self, session: Session, name: str) -> Iterator[ServingVersion]:
        """Any version of this base, held for one request (admins compare versions this way).

        The active and recently retired versions are in memory already; another one is built
        into its own copy of the weights, kept for the next request that asks for it.
        """
        row = get_by_name(session, name)
        if row.base_model != self.base_model_name:
            raise Conflict(f"version {name!r} is built on another base model")
        if row.id == self.base.id:
            yield self.base  # never recycled
            return
        with self.registry.lease_loaded(row.id) as loaded:
            if loaded is not None:
                yield loaded
                return
        if row.status is VersionStatus.refused:
            raise Conflict(f"version {name!r} was refused: {row.status_reason}")
        with self._pinning:
            pinned = self._pinned
            if pinned is None or pinned.id != row.id:
                try:
                    pinned = in_short_thread(lambda: load_adapter_version(row, self.base))
                except (CorruptCheckpoint, OSError, ValueError) as exc:
                    raise Conflict(f"version {name!r} cannot be served: {exc}") from None
                # The one it replaces is freed when the requests holding it finish.
                self._pinned = pinned
        yield pinned

    def preallocate(self) -> None:
        """Keep memory ready for the next swaps to build in (when SWAP_PREALLOCATE is on).

        One idle model is enough once an adapter has been served, because each swap retires
        the one before; while the base serves, the first swap retires nothing reusable, so two
        are kept, and no allocation runs right after a swap, when the next may follow. None
        where adapters are served on the base's weights (the Llama-family path).
        """
        if not self.settings.swap_preallocate or self.base.llama is not None:
            return
        wanted = 2 if self.registry.active is self.base else 1
        for _ in range(wanted - self.registry.idle_models()):
            self.registry.add_spare(in_short_thread(lambda: spare_copy(self.base)))

    def _refuse(self, session: Session, row: ModelVersion, reason: str) -> None:
        """Mark a version that cannot be loaded as refused and put back what this process serves."""
        log.error("refused model version %s: %s", row.name, reason)
        refuse(session, version=row, reason=reason)
        serving = session.get(ModelVersion, self.registry.active.id)
        if serving is not None and serving.status is not VersionStatus.refused:
            activate(session, serving)
        else:
            session.commit()

    def _poll(self) -> None:
        import app.engine.lora  # noqa: F401  (PEFT imported once, not by the first swap)

        try:
            with self._syncing:
                self.preallocate()
        except Exception:  # serving goes on without it; swaps then allocate
            log.exception("allocating a spare copy of the weights failed")
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:  # a database outage must not kill the follower
                log.exception("checking the active model version failed")
            self._wake.wait(self.settings.swap_poll_interval)
            self._wake.clear()

    def _listen(self) -> None:
        import redis

        assert self.settings.redis_url
        while not self._stop.is_set():
            try:
                client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._wake.set()
            except redis.RedisError as exc:
                log.warning("version announcements unavailable (%s); polling only", exc)
                self._stop.wait(5)
