"""RecentRate: per-second counts of the last minute, the Serving page's recent throughput."""

from __future__ import annotations

from services.inference.throughput import RecentRate


def test_the_rate_covers_whole_seconds_of_the_window_and_forgets_older_ones():
    rate = RecentRate(window_s=60)
    for second in range(100, 110):
        rate.add(30, now=second + 0.5)
        rate.add(10, now=second + 0.9)
    assert rate.rate(10, now=110.2) == 40.0  # seconds 100..109, 40 tokens each
    assert rate.rate(5, now=110.2) == 40.0
    rate.add(1000, now=110.5)  # the current second is partial: not counted yet
    assert rate.rate(10, now=110.7) == 40.0
    assert rate.rate(10, now=111.0) == (9 * 40 + 1000) / 10
    assert rate.rate(60, now=300.0) == 0.0
    rate.add(5, now=300.0)
    assert len(rate._buckets) == 1  # older buckets went when the window moved past them
