"""Adapter-aware admission, driven with real asyncio tasks (no engine): the policy alone."""

from __future__ import annotations

import asyncio

from services.inference.scheduler import AdapterScheduler


async def _request(scheduler: AdapterScheduler, adapter: str | None, hold_s: float, log: list) -> None:
    async with scheduler.admit(adapter):
        log.append(("in", adapter, set(scheduler.active)))
        await asyncio.sleep(hold_s)


def test_at_most_slots_adapters_at_once_and_base_needs_none():
    async def run():
        scheduler = AdapterScheduler(slots=2, max_wait_s=10)
        log: list = []
        jobs = [_request(scheduler, f"a{i % 5}", 0.02, log) for i in range(40)]
        jobs += [_request(scheduler, None, 0.02, log) for _ in range(5)]
        await asyncio.gather(*jobs)
        return scheduler, log

    scheduler, log = asyncio.run(run())
    assert len(log) == 45 and scheduler.peak_active == 2
    assert all(len(active) <= 2 for _, _, active in log)
    assert not scheduler.active and not scheduler.waiting  # every place given back


def test_a_busy_adapter_does_not_starve_the_others():
    """Requests keep arriving for a0, which holds the only slot: once a1 has waited max_wait_s, a0's new
    requests queue too, a0 drains, and a1 gets the slot."""

    async def run():
        scheduler = AdapterScheduler(slots=1, max_wait_s=0.2)
        log: list = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        tasks = [asyncio.create_task(_request(scheduler, "a0", 0.05, log))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(_request(scheduler, "a1", 0.01, log)))
        while loop.time() - started < 1.0:  # a steady stream for a0, each overlapping the next
            tasks.append(asyncio.create_task(_request(scheduler, "a0", 0.05, log)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        return log, started

    log, _ = asyncio.run(run())
    order = [adapter for kind, adapter, _ in log]
    position = order.index("a1")
    assert position < len(order) - 1  # a1 did not wait for the stream to end
    assert "a0" in order[position + 1 :]  # and a0 went on afterwards


def test_the_longest_queue_gets_a_freed_slot():
    async def run():
        scheduler = AdapterScheduler(slots=1, max_wait_s=10)
        log: list = []
        first = asyncio.create_task(_request(scheduler, "hot", 0.05, log))
        await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(_request(scheduler, "one", 0.01, log))]
        waiting += [asyncio.create_task(_request(scheduler, "many", 0.01, log)) for _ in range(3)]
        await asyncio.gather(first, *waiting)
        return [adapter for _, adapter, _ in log]

    order = asyncio.run(run())
    assert order[:4] == ["hot", "many", "many", "many"] and order[4] == "one"


def test_a_cancelled_waiter_leaves_no_trace():
    async def run():
        scheduler = AdapterScheduler(slots=1, max_wait_s=10)
        holder = asyncio.create_task(_request(scheduler, "a", 0.1, []))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(_request(scheduler, "b", 0.01, []))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(holder, waiter, return_exceptions=True)
        return scheduler

    scheduler = asyncio.run(run())
    assert not scheduler.active and not scheduler.waiting
