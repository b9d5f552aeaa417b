"""Wake-ups for watch loops (registry events, a job's events): one per key, safe from any thread.

A watch loop takes `current(key)` *before* it reads what is new, then waits on it: a change made
between the read and the wait has already set that event, so it is never missed. Writers call
`notify(key)` after they commit, from the event loop or from a worker thread (store calls run in
threads). Waits are bounded, so changes written by another replica are picked up by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable


class Changes:
    def __init__(self) -> None:
        self._events: dict[Hashable, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def current(self, key: Hashable = None) -> asyncio.Event:
        """The event the next change of `key` sets (call on the event loop)."""
        self._loop = asyncio.get_running_loop()
        return self._events.setdefault(key, asyncio.Event())

    def notify(self, key: Hashable = None) -> None:
        """Something of `key` changed (call from any thread)."""
        loop = self._loop
        if loop is None:
            return  # nobody has watched yet
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._wake(key)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, key)

    def _wake(self, key: Hashable) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    @staticmethod
    async def wait(seen: asyncio.Event, timeout_s: float) -> None:
        """Until `seen` (from `current`) is set, or `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(seen.wait(), timeout_s)
