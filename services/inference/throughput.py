"""Recent throughput of a replica (tokens and requests per second), for its serving page.

Prometheus counters give rates to a monitoring stack; the console asks the replica itself, so it
keeps per-second counts of the last minute (60 buckets at most: constant memory and O(1) per add).
"""

from __future__ import annotations

import time
from collections import deque


class RecentRate:
    """Counts per second over the last `window_s` seconds."""

    def __init__(self, window_s: int = 60) -> None:
        self.window_s = window_s
        self._buckets: deque[list[int]] = deque()  # [second, count], oldest first

    def add(self, n: int = 1, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += n
            return
        self._buckets.append([second, n])
        while self._buckets[0][0] <= second - self.window_s:
            self._buckets.popleft()

    def rate(self, over_s: int = 10, now: float | None = None) -> float:
        """Mean per second over the last `over_s` whole seconds (the current, partial second left out)."""
        second = int(time.monotonic() if now is None else now)
        total = sum(count for at, count in self._buckets if second - over_s <= at < second)
        return total / over_s
