"""Row packing: best-fit decreasing puts every example in exactly one row, none over the limit,
and fills rows fuller than packing in order does."""

from __future__ import annotations

import random

import pytest

from services.trainer.worker.training.batches import pack_rows


def _in_order(lengths: list[int], max_len: int) -> list[list[int]]:
    """Packing as TuneDock did before: consecutive examples while they fit."""
    rows, used = [[]], 0
    for index, n in enumerate(lengths):
        if rows[-1] and used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += n
    return rows


def _alpaca_like(n: int, seed: int = 0) -> list[int]:
    """Token lengths shaped like alpaca's under a chat template: most short, a long tail, truncated."""
    rng = random.Random(seed)
    return [min(512, max(12, int(rng.lognormvariate(4.6, 0.7)))) for _ in range(n)]


@pytest.mark.parametrize("window", [4096, 100])
def test_every_example_lands_in_one_row_within_the_limit(window):
    lengths = _alpaca_like(10_000)
    rows = pack_rows(lengths, 512, window=window)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in row) for row in rows) <= 512
    assert all(row == sorted(row) for row in rows)
    # A window never mixes with the next: TRL's map batches, the same boundaries.
    assert all(len({i // window for i in row}) == 1 for row in rows)
    assert pack_rows(lengths, 512, window=window) == rows  # deterministic


def test_rows_are_fuller_than_packing_in_order():
    lengths = _alpaca_like(20_000)
    fill = lambda rows: sum(lengths) / len(rows)  # noqa: E731
    best_fit, in_order = fill(pack_rows(lengths, 512)), fill(_in_order(lengths, 512))
    assert best_fit > 500 and in_order < 450, (best_fit, in_order)


def test_examples_of_the_full_length_get_a_row_each():
    assert pack_rows([512, 512, 10, 502], 512) == [[0], [1], [2, 3]]
