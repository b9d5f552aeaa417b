"""Adapter-aware admission: the engine holds requests of at most `slots` adapters at a time.

vLLM 0.32 runs at most `max_loras` adapters per step and skips waiting requests whose adapter
has no slot; but a busy adapter keeps its slot as long as its requests keep coming, so a rarely
used adapter can wait behind four busy ones indefinitely, and every waiting request is scanned
at every step. As S-LoRA and LoRAX do, requests wait here instead, in one queue per adapter,
and adapters take turns. The service admits two waves: `slots` = 2 x max_loras, so the engine
runs one wave while the next is already tokenized and queued (admitting only `max_loras` would
idle the engine between waves). The rules:

- a request for an adapter the engine is working on goes straight in (it costs no slot);
- a new adapter goes in while a slot is free; otherwise it queues;
- when an adapter's last request finishes, its slot goes to the waiting adapter that has
  waited longest, once anyone has waited `max_wait_s`; before that, to the longest queue
  (one slot, most requests served);
- no adapter starves: once another adapter has waited `max_wait_s`, new requests for adapters
  already in the engine queue too, so those drain and free their slots.

Requests with no adapter take no slot (unless base requests run through the zero adapter,
which the caller then names like any adapter).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class _Waiter:
    since: float
    future: asyncio.Future = field(repr=False)


class AdapterScheduler:
    def __init__(self, slots: int, max_wait_s: float = 2.0, metrics=None) -> None:
        self.slots = slots
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.active: dict[str, int] = {}  # adapter -> admitted requests not finished
        self.waiting: dict[str, deque[_Waiter]] = {}
        self.peak_active = 0
        """Most adapters in the engine at once so far (never above `slots`)."""

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    @asynccontextmanager
    async def admit(self, adapter: str | None) -> AsyncIterator[float]:
        """Hold a place for one request on `adapter` (None: no slot needed); yields seconds waited."""
        if adapter is None:
            yield 0.0
            return
        started = time.monotonic()
        if self._may_enter(adapter, started):
            self.active[adapter] = self.active.get(adapter, 0) + 1
            self._observe()
        else:
            waiter = _Waiter(started, asyncio.get_running_loop().create_future())
            self.waiting.setdefault(adapter, deque()).append(waiter)
            self._observe()
            try:
                await waiter.future  # the dispatcher counted us in before resolving it
            except asyncio.CancelledError:
                if waiter.future.done() and not waiter.future.cancelled():
                    self._leave(adapter)  # admitted as we were cancelled: give the place back
                else:
                    self._forget(adapter, waiter)
                raise
        waited = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.admission_wait.observe(waited)
        try:
            yield waited
        finally:
            self._leave(adapter)

    # ------------------------------------------------------------------------------ policy

    def _starving(self, now: float) -> bool:
        """Some adapter outside the engine has waited past the bound."""
        return any(q and q[0].since + self.max_wait_s <= now for a, q in self.waiting.items() if a not in self.active)

    def _may_enter(self, adapter: str, now: float) -> bool:
        if self._starving(now):
            return False
        if adapter in self.active:
            return not self.waiting.get(adapter)  # keep arrival order within an adapter
        return len(self.active) < self.slots and not any(self.waiting.values())

    def _leave(self, adapter: str) -> None:
        left = self.active.get(adapter, 0) - 1
        if left > 0:
            self.active[adapter] = left
        else:
            self.active.pop(adapter, None)
        self._dispatch()

    def _dispatch(self) -> None:
        now = time.monotonic()
        starving = self._starving(now)
        # Adapters already in the engine get their queued requests back unless someone starves.
        if not starving:
            for adapter in [a for a in self.waiting if a in self.active]:
                self._let_in(adapter)
        while len(self.active) < self.slots:
            candidates = [a for a, q in self.waiting.items() if q and a not in self.active]
            if not candidates:
                break
            if starving:
                chosen = min(candidates, key=lambda a: self.waiting[a][0].since)
            else:
                chosen = max(candidates, key=lambda a: (len(self.waiting[a]), -self.waiting[a][0].since))
            self._let_in(chosen)
            starving = self._starving(now)
        self._observe()

    def _let_in(self, adapter: str) -> None:
        queue = self.waiting.pop(adapter, deque())
        for waiter in queue:
            if not waiter.future.done():
                self.active[adapter] = self.active.get(adapter, 0) + 1
                waiter.future.set_result(None)

    def _forget(self, adapter: str, waiter: _Waiter) -> None:
        queue = self.waiting.get(adapter)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self.waiting[adapter]
        self._dispatch()

    def _observe(self) -> None:
        self.peak_active = max(self.peak_active, len(self.active))
        if self.metrics is not None:
            self.metrics.queued.set(self.queued)
            self.metrics.active_adapters.set(len(self.active))
