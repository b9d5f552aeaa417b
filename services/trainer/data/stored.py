"""A stored dataset read back record by record, from the blob store's chunks (local disk or S3).

Stored datasets are JSONL, or a JSON array as uploaded; reading stops when the caller stops
iterating, so the first records of a gigabyte dataset cost what they hold.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator

from services.trainer.data.sources import json_array_records


class ChunkReader(io.RawIOBase):
    """A binary file over an iterator of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks, self._left = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n], self._left = self._left[:n], self._left[n:]
        return n


def stored_records(chunks: Iterable[bytes]) -> Iterator[tuple[str, object]]:
    """(position, record) of a stored dataset, read lazily."""
    binary = io.BufferedReader(ChunkReader(chunks), buffer_size=1 << 20)
    head = binary.peek(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    text = io.TextIOWrapper(binary, encoding="utf-8-sig")
    if head == b"[":
        yield from json_array_records(text)
        return
    for number, line in enumerate(text, start=1):
        if line.strip():
            yield f"line {number}", json.loads(line)
