"""Rate limits per API key, counted in Redis when it is configured, else in this process."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import parse_many
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from app.config import Settings

log = logging.getLogger(__name__)

# After the store fails, requests pass unlimited for this long before it is tried again: an
# outage then costs neither a connection attempt nor a warning on every request.
RETRY_STORE_AFTER = 5.0


@dataclass(frozen=True)
class Refusal:
    """A request over a limit: which limit, and the whole seconds until one more is allowed."""

    kind: str
    limit: str
    retry_after: int

    @property
    def message(self) -> str:
        """What was hit and when to retry, for the caller."""
        return (
            f"too many {self.kind} requests: the limit is {self.limit} per API key; "
            f"retry in {self.retry_after} s"
        )


class RateLimits:
    """Named limits (generation, feedback, read), each counted per caller over a moving window."""

    def __init__(self, limits: dict[str, str | None], redis_url: str | None) -> None:
        self._limits = {kind: parse_many(value) for kind, value in limits.items() if value}
        # Short timeouts: a stalled Redis must not hold requests up, they pass instead.
        options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5} if redis_url else {}
        storage = storage_from_string(
            redis_url or "memory://", wrap_exceptions=True, key_prefix="flm-rate", **options
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._skip_until = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        """The generation, feedback and read limits the settings name, in Redis when it is set."""
        limits = {
            "generation": settings.rate_limit_generation,
            "feedback": settings.rate_limit_feedback,
            "read": settings.rate_limit_read,
        }
        return cls(limits, settings.redis_url)

    def hit(self, kind: str, caller: str) -> Refusal | None:
        """Count one request of `kind` by `caller`; a Refusal when it is over a limit.

        When the store is unreachable the request is let through (with a warning in the log):
        generation and ratings must keep working while Redis is down.
        """
        if time.monotonic() < self._skip_until:
            return None
        try:
            for item in self._limits.get(kind, ()):
                if not self._limiter.hit(item, kind, caller):
                    reset, _ = self._limiter.get_window_stats(item, kind, caller)
                    return Refusal(kind, str(item), max(1, math.ceil(reset - time.time())))
        except StorageError as exc:
            self._skip_until = time.monotonic() + RETRY_STORE_AFTER
            log.warning(
                "rate limits not enforced for %.0f s: their store is unavailable (%s)",
                RETRY_STORE_AFTER,
                exc.storage_error,
            )
        return None
