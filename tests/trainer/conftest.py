"""Trainer fixtures: small memorization datasets for the tiny model."""

from __future__ import annotations

import json

import pytest

from services.trainer.data.records import parse_dataset


def memorization_jsonl(n: int = 8) -> bytes:
    return "\n".join(
        json.dumps({"instruction": f"What does the pirate say about ship {i}?", "output": f"Arr, ship {i} be mine!"})
        for i in range(n)
    ).encode()


@pytest.fixture(scope="session")
def memorization_examples():
    return parse_dataset(memorization_jsonl()).examples
