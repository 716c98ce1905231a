"""What a serving process loads, and how it follows the active version without a restart."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel

from app.config import DEFAULT_MODEL, Settings
from app.ml.checkpoints import CorruptCheckpoint, verify_checkpoint
from app.ml.loading import DEFAULT_SOURCE, load_model, resolve_dtype
from app.ml.registry import ModelRegistry, ServingVersion
from app.models import ModelVersion, VersionKind, VersionStatus
from app.services.errors import Conflict
from app.services.notify import CHANNEL
from app.services.versions import (
    activate,
    active_version,
    base_of,
    ensure_base_version,
    get_by_name,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelNotPrepared(RuntimeError):
    """The default model has not been downloaded and converted yet."""


def base_model_dir(settings: Settings) -> Path:
    """The directory of the configured base model."""
    if settings.model != DEFAULT_MODEL:
        return Path(settings.model).resolve()
    path = (settings.models_dir / DEFAULT_SOURCE.name).resolve()
    if not (path / "config.json").is_file():
        raise ModelNotPrepared(
            f"the default model is not prepared in {path}: run `python -m app.cli setup` first"
        )
    return path


def load_base_version(session: Session, settings: Settings) -> ServingVersion:
    """Register the configured base model as a version if needed, and load it."""
    path = base_model_dir(settings)
    base = base_of(session, ensure_base_version(session, settings.model, str(path)))
    dtype = resolve_dtype(settings.model_dtype)

    def build() -> ServingVersion:
        model, tokenizer = load_model(path, dtype)
        version = ServingVersion(base.id, base.name, model, tokenizer)
        if version.llama is not None and version.llama.four_bit:
            log.info(
                "decode steps run %d projections on 4-bit weights: the checkpoint's weights "
                "already are 4-bit (as from a Q4_1 GGUF), so nothing is lost",
                version.llama.four_bit,
            )
        return version

    return in_short_thread(build)  # called on the event loop's thread, which lives on


def load_adapter_version(
    row: ModelVersion,
    base: ServingVersion,
    spare: Callable[[], PreTrainedModel | None] = lambda: None,
) -> ServingVersion:
    """Verify an adapter version's files and serve it on the base's weights, or on a copy.

    On the Llama-family decode path a plain LoRA adapter is applied unmerged, in float32, on
    top of the base's own decode weights (4-bit or packed bf16): building it copies no weights,
    and it decodes nearly as fast as the base. Otherwise the adapter is merged into a float32
    copy of the base, in the memory of `spare()` (an idle model of the same base) when there is
    one, since allocating a new copy costs more than the merge.
    """
    from peft import PeftModel  # heavy; imported by the follower thread before the first swap

    from app.ml.lora import merge_lora, read_lora

    verify_checkpoint(Path(row.path))
    adapted = None
    if base.llama is not None and (lora := read_lora(base.model, Path(row.path))) is not None:
        adapted = base.llama.adapted(lora)
    if adapted is not None:
        return ServingVersion(
            row.id, row.name, base.model, base.tokenizer, shares_base=True, llama=adapted
        )
    model = _copy_of(base.model, spare(), adapter_dtype(base.model.dtype))
    if not merge_lora(model, Path(row.path)):
        model = PeftModel.from_pretrained(model, row.path).merge_and_unload()
    model.eval()
    # Packing a copy of the weights (allocating and reordering 540 MB in fp32) made a swap take
    # 4.1 s instead of 1.6 s with two processes generating (bench/swap.py, p50).
    return ServingVersion(row.id, row.name, model, base.tokenizer, recyclable=True, pack=False)


def in_short_thread(work: Callable[[], T]) -> T:
    """Run torch work in a thread that ends with it, and return its result (or raise).

    A long-lived thread that has run parallel torch operations keeps its own OpenMP worker
    pool, and while it lives the generation thread's matrix products run about as slowly as
    on one core (GNU OpenMP throttles its threads once they outnumber the cores). Measured
    here: a 16x576x1536 product took 0.60-0.92 ms in the generation thread when the main
    thread had loaded the model, 0.39-0.44 ms when a short-lived thread had; a batch-16 step
    of the default model, 190 against 110 ms. So nothing but the generation thread runs
    parallel torch work for longer than one task: not the event loop's thread (which loads the
    base), not the follower (which builds versions).
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="model-build")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter versions merged into a copy of the weights are served in: float32 when
    the base serves in half precision.

    A round's LoRA update is mostly below bfloat16's resolution: merged into bfloat16 weights,
    only 3% of them changed at all (measured). Merged in float32 the whole update is kept; the
    cost is float32 speed for adapter versions (at batch 16 on an AMX CPU, 172 against 270
    tok/s for bfloat16).
    """
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


def _as(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """`model` with its weights in `dtype` (in place when they already are)."""
    torch.nn.Module.to(model, dtype)  # transformers' typing of `.to` rejects a dtype
    return model


def _copy_of(
    model: PreTrainedModel, spare: PreTrainedModel | None, dtype: torch.dtype
) -> PreTrainedModel:
    """The base weights, as `dtype`, in `spare` if it has that layout, else in a new copy."""
    if spare is not None:
        source, target = model.state_dict(), spare.state_dict()
        if source.keys() == target.keys() and all(
            source[k].shape == target[k].shape and target[k].dtype == dtype for k in source
        ):
            with torch.no_grad():  # one call: no per-tensor trips through the interpreter
                torch._foreach_copy_(list(target.values()), list(source.values()))
            return spare
    return _as(copy.deepcopy(model), dtype)


class VersionFollower:
    """Keeps a process on the active version: polls the database, woken early by Redis messages.

    Loading happens on this background thread; the registry swaps a pointer, so requests in
    flight finish on the version they started with.
    """

    def __init__(
        self, sessions: sessionmaker[Session], settings: Settings, registry: ModelRegistry,
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
        dtype = adapter_dtype(self.base.model.dtype)
        for _ in range(wanted - self.registry.idle_models()):
            self.registry.add_spare(
                in_short_thread(lambda: _as(copy.deepcopy(self.base.model), dtype))
            )

    def _refuse(self, session: Session, row: ModelVersion, reason: str) -> None:
        """Mark a version that cannot be loaded as refused and put back what this process serves."""
        log.error("refused model version %s: %s", row.name, reason)
        row.status = VersionStatus.refused
        row.status_reason = reason
        session.flush()
        serving = session.get(ModelVersion, self.registry.active.id)
        if serving is not None and serving.status is not VersionStatus.refused:
            activate(session, serving)
        else:
            session.commit()

    def _poll(self) -> None:
        import app.ml.lora  # noqa: F401  (imports PEFT once, so the first swap does not pay for it)

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
