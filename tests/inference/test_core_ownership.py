"""Which adapter names a replica owns (served recently): remembered, and forgotten once stale."""

from __future__ import annotations

from services.inference import core as core_module
from services.inference.core import InferenceCore, Limits
from services.inference.scheduler import AdapterScheduler


def _core(window_s: float) -> InferenceCore:
    # Ownership needs no engine, registry or cache: only the clock.
    return InferenceCore(None, None, None, None, Limits(), AdapterScheduler(2), warm_window_s=window_s)  # type: ignore[arg-type]


def test_a_name_served_within_the_window_is_owned_and_a_stale_one_is_not(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(core_module.time, "monotonic", lambda: clock[0])
    core = _core(window_s=60)
    core.note_served("pirate")
    clock[0] += 30
    assert core.owns("pirate") and not core.owns("robot")
    clock[0] += 31
    assert not core.owns("pirate")


def test_stale_names_are_dropped_so_the_map_stays_bounded(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(core_module.time, "monotonic", lambda: clock[0])
    core = _core(window_s=10)
    for i in range(5000):  # one new name per second: at most ~10 are within the window at any time
        clock[0] += 1
        core.note_served(f"adapter-{i}")
    assert len(core.served) <= 1024
    assert core.owns("adapter-4999") and core.owns("adapter-4990")
    assert "adapter-0" not in core.served
