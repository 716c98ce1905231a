"""The version a process serves: loaded off the request path, swapped under a lock.

Requests lease the version they run on. A version that stops being active is kept as
*retired* while it is in use and afterwards, so that rolling back to it is instant. A version
with its own copy of the weights (merged, outside the Llama family) can have its buffers
recycled for the next version once no request holds it: allocating fresh memory for a model
costs more than building the version itself on this kind of machine. Llama-family adapter
versions decode on the base's weights and own only their LoRA matrices.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.engine.llama.weights import LlamaWeights


@dataclass(frozen=True, eq=False)
class ServingVersion:
    """A loaded model version; requests hold on to the one they started with."""

    id: int
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    recyclable: bool = False
    """Whether its weights may be overwritten once retired (never for the base model)."""
    shares_base: bool = False
    """Whether it decodes on the base model's weights plus its own LoRA update (`llama` is
    given): nothing to recycle, and cheap to keep once retired."""
    pack: bool = True
    """Whether decode steps run on weights arranged for speed (4-bit where the weights already
    are, else packed copies; `app/engine/llama/weights.py`) instead of the model's own: faster
    steps, for more memory and build time."""
    kv_dtype: torch.dtype = torch.float32
    """What its KV caches hold keys and values in on the Llama-family path (KV_CACHE_DTYPE)."""
    llama: LlamaWeights | None = None
    """The layers arranged for the Llama-family decode path (arranged from `model` when not
    given); None after construction: transformers' forward."""
    context_length: int = field(init=False)

    @property
    def fingerprint(self) -> str:
        """The version and the dtype it computes in (OpenAI's `system_fingerprint`): a seeded
        answer can change when this does."""
        return f"fp_{self.name}_{str(self.model.dtype).removeprefix('torch.')}"

    def __post_init__(self) -> None:
        length = getattr(self.model.config, "max_position_embeddings", None) or 2048
        object.__setattr__(self, "context_length", int(length))
        if self.llama is None:
            # Packed from the weights as they are now: a version is built before it is wrapped.
            object.__setattr__(self, "llama", LlamaWeights.of(self.model, self.pack, self.kv_dtype))


class NoModelLoaded(RuntimeError):
    """Raised when a request arrives before any version is loaded."""


class ModelRegistry:
    """Holds the active version of this process and the recently retired ones."""

    def __init__(self, keep_retired: int = 1) -> None:
        self.keep_retired = keep_retired
        """How many retired versions stay loaded (each costs one copy of the weights)."""
        self._lock = threading.Lock()
        self._active: ServingVersion | None = None
        self._retired: list[ServingVersion] = []  # oldest first
        self._leases: Counter[ServingVersion] = Counter()
        self._spares: list[PreTrainedModel] = []

    @property
    def active(self) -> ServingVersion:
        """The version new requests use."""
        version = self._active
        if version is None:
            raise NoModelLoaded("no model version is loaded yet")
        return version

    @property
    def ready(self) -> bool:
        """Whether a version is loaded."""
        return self._active is not None

    @contextmanager
    def lease(self) -> Iterator[ServingVersion]:
        """The active version, kept intact for as long as the caller holds it."""
        with self._lock:
            version = self.active
            self._leases[version] += 1
        try:
            yield version
        finally:
            self._release(version)

    @contextmanager
    def lease_loaded(self, version_id: int) -> Iterator[ServingVersion | None]:
        """The active or a retired version with this id, held intact; None if not in memory."""
        with self._lock:
            candidates = [self._active, *self._retired]
            version = next((v for v in candidates if v is not None and v.id == version_id), None)
            if version is not None:
                self._leases[version] += 1
        try:
            yield version
        finally:
            if version is not None:
                self._release(version)

    def _release(self, version: ServingVersion) -> None:
        with self._lock:
            self._leases[version] -= 1
            if self._leases[version] <= 0:
                del self._leases[version]

    def activate(self, version: ServingVersion) -> None:
        """Make an already loaded version the one new requests use."""
        with self._lock:
            previous, self._active = self._active, version
            if version in self._retired:
                self._retired.remove(version)
            kept = previous is not None and (previous.recyclable or previous.shares_base)
            if previous is not None and previous is not version and kept:
                self._retired.append(previous)
                # Dropping the reference frees the weights once the last request finishes.
                del self._retired[: max(0, len(self._retired) - self.keep_retired)]

    def retired(self, version_id: int) -> ServingVersion | None:
        """A retired version still loaded, which can be activated again without loading."""
        with self._lock:
            return next((v for v in self._retired if v.id == version_id), None)

    def add_spare(self, model: PreTrainedModel) -> None:
        """Keep an allocated model no version uses, for the next version to be built in."""
        with self._lock:
            self._spares.append(model)

    def idle_models(self) -> int:
        """How many models `take_spare` could return now."""
        with self._lock:
            idle = sum(v.recyclable and self._leases[v] == 0 for v in self._retired)
            return len(self._spares) + idle

    def take_spare(self) -> PreTrainedModel | None:
        """Take a model no request holds (a spare, else the oldest idle retired version)."""
        with self._lock:
            if self._spares:
                return self._spares.pop()
            for version in self._retired:
                if version.recyclable and self._leases[version] == 0:
                    self._retired.remove(version)
                    return version.model
            return None
