"""The version a process serves: loaded off the request path, swapped under a lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True, eq=False)
class ServingVersion:
    """A loaded model version; requests hold on to the one they started with."""

    id: int
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    context_length: int = field(init=False)

    def __post_init__(self) -> None:
        length = getattr(self.model.config, "max_position_embeddings", None) or 2048
        object.__setattr__(self, "context_length", int(length))


class NoModelLoaded(RuntimeError):
    """Raised when a request arrives before any version is loaded."""


class ModelRegistry:
    """Holds the active version of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: ServingVersion | None = None

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

    def activate(self, version: ServingVersion) -> None:
        """Make an already loaded version the one new requests use."""
        with self._lock:
            self._active = version
