"""Handing a step's text from the generation thread to the event loops: one wake-up per loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading

STEP = threading.local()  # the generation thread's outbox while it runs a step


class Outbox:
    """Deltas for event loops, handed over once per step.

    Waking an event loop once per request and token made the loop's thread compete with the
    matrix products for the two cores at every token of every stream; one wake-up per step
    carries all of a step's deltas.
    """

    def __init__(self) -> None:
        self._pending: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[str | None], str | None]]
        ] = {}

    def add(
        self, loop: asyncio.AbstractEventLoop, handoff: asyncio.Queue[str | None], delta: str | None
    ) -> None:
        """Queue a delta for a stream's event loop."""
        self._pending.setdefault(loop, []).append((handoff, delta))

    def flush(self) -> None:
        """Hand every queued delta to its event loop: one wake-up per loop."""
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            # RuntimeError: the event loop is gone (shutdown), so nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue[str | None], str | None]]) -> None:
    for handoff, delta in items:
        handoff.put_nowait(delta)
