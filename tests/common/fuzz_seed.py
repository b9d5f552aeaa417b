"""Which examples the fuzz tests draw: the same ones every run unless asked otherwise.

TUNEDOCK_FUZZ_SEED unset (or "fixed"): derandomized, the CI gate. "random": one fresh seed for
the whole session, chosen here once and shown in pytest's header. A number: that seed (replay).
"""

from __future__ import annotations

import functools
import os
import random


@functools.cache
def fuzz_seed() -> int | None:
    """None for the fixed (derandomized) examples, else the seed of this session."""
    value = os.environ.get("TUNEDOCK_FUZZ_SEED", "").strip().lower()
    if value in ("", "fixed"):
        return None
    if value == "random":
        return random.SystemRandom().randrange(2**32)
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"TUNEDOCK_FUZZ_SEED must be empty, 'fixed', 'random' or a number, got {value!r}")
    return int(value)


def describe() -> str:
    chosen = fuzz_seed()
    if chosen is None:
        return "fuzz: fixed examples (derandomized); TUNEDOCK_FUZZ_SEED=random explores new ones"
    return f"fuzz: seed {chosen}; replay with TUNEDOCK_FUZZ_SEED={chosen}"
