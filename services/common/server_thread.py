"""Run a real `GrpcServer` in a background event-loop thread, for synchronous callers (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

from services.common.server import GrpcServer


class ServerThread:
    """Starts `build()`'s server on its own loop; `.address`, `.server`, `.stop()`."""

    def __init__(
        self, build: Callable[[], Awaitable[GrpcServer]], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        """`loop`: run on another ServerThread's loop, e.g. to share a vLLM engine, whose
        async engine is bound to the loop it was started on."""
        self.owns_loop = loop is None
        self.loop = loop or asyncio.new_event_loop()
        self.thread = None
        if self.owns_loop:
            self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self.thread.start()
        self.server: GrpcServer = self.run(self._start(build))

    async def _start(self, build):
        server = await build()
        await server.start()
        return server

    def run(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self, grace: float = 0.5) -> None:
        self.run(self.server.stop(grace))
        if self.owns_loop:
            self.loop.call_soon_threadsafe(self.loop.stop)
            assert self.thread is not None
            self.thread.join(10)
