"""Whether a service can still write its own state, after a write failed for want of space.

One full-disk error does not make a service unhealthy: a 30 MB upload into 20 MB fails, its bytes
are removed, and the next upload that fits succeeds. So a full-disk error triggers a probe: a small
file written, synced and removed in each of the service's state directories. Only if the probe
fails does health turn NOT_SERVING (load balancers and probes stop sending it work it cannot store),
and the probe then runs every few seconds until it succeeds, when health turns SERVING again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_BYTES = 1 << 20
"""What the probe writes: room for a small write (an event row, an alias move) and its journal."""


class WritableProbe:
    def __init__(
        self,
        dirs: list[Path],
        set_serving: Callable[[bool], Awaitable[None]],
        every_s: float = 2.0,
        probe_bytes: int = PROBE_BYTES,
    ) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.set_serving = set_serving
        self.every_s = every_s
        self.probe_bytes = probe_bytes
        self.unwritable: str = ""
        """Why the state cannot be written now ("" while it can)."""
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def check(self) -> str:
        """ "" if every state directory takes a small synced write; else what failed."""
        for directory in self.dirs:
            probe = directory / f".tunedock-writable-{os.getpid()}"
            try:
                directory.mkdir(parents=True, exist_ok=True)
                with probe.open("wb") as fh:
                    fh.write(b"\0" * self.probe_bytes)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                return f"{directory}: {exc.strerror or exc}"
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink()
        return ""

    def full_disk_seen(self) -> None:
        """A write failed for want of space (from any thread): probe soon."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Probe after each full-disk error; while the probe fails, NOT_SERVING, probing every `every_s`."""
        self._loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            why = await asyncio.to_thread(self.check)
            if not why:
                continue
            self.unwritable = why
            log.error("cannot write this service's state (%s): NOT_SERVING until it can", why)
            await self.set_serving(False)
            while why:
                await asyncio.sleep(self.every_s)
                why = await asyncio.to_thread(self.check)
            self.unwritable = ""
            log.info("this service's state is writable again: SERVING")
            await self.set_serving(True)
