"""A job's datasets on the worker's disk, read one record at a time: memory holds offsets, not records.

Each dataset is downloaded once per node into a cache folder shared by jobs (datasets are
content-addressed, so a cached file never goes stale) and indexed by the byte offset of every
record (8 bytes a record: 8 MB for a million). `DatasetFile[i]` parses and validates record `i`
when training reaches it, so a job on a million records starts without parsing them all, and a
20-step job reads only the records its steps use. Stored JSON arrays are rewritten once as JSONL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from services.trainer.data.records import Example, detect_format, to_example
from services.trainer.data.sources import SourceOptions, detect

SCAN_CHUNK = 64 << 20
KEEP_DATASETS = 16
"""Datasets kept in a node's cache, least recently used evicted first (a job in flight keeps its own)."""


class DatasetFile(Sequence[Example]):
    """One stored dataset (JSONL) with its record offsets: a sequence of Examples, parsed on access."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.starts, self.ends = line_spans(path)
        self._file = path.open("rb")
        first = self.record(0) if len(self) else None
        self.format = detect_format(first) if isinstance(first, dict) else ""

    @property
    def identity(self) -> str:
        """The dataset's id: content-addressed, so it names these records and no others."""
        return self.path.stem

    def __len__(self) -> int:
        return len(self.starts)

    def record(self, index: int) -> object:
        start, end = int(self.starts[index]), int(self.ends[index])
        self._file.seek(start)
        return json.loads(self._file.read(end - start))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return to_example(self.record(index), self.format, f"{self.path.stem} record {index}")

    def close(self) -> None:
        self._file.close()


class Concatenated(Sequence[Example]):
    """Several sequences of examples as one, in order."""

    def __init__(self, parts: Iterable[Sequence[Example]]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.bounds = np.cumsum([0, *(len(p) for p in self.parts)])

    @property
    def identity(self) -> str:
        return _digest("+".join(identity_of(p) for p in self.parts).encode())

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0 or index >= len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.bounds, index, side="right")) - 1
        return self.parts[part][index - int(self.bounds[part])]


class Subset(Sequence[Example]):
    """The examples of `source` at `indices` (a split of it), in that order."""

    def __init__(self, source: Sequence[Example], indices: np.ndarray) -> None:
        self.source, self.indices = source, indices

    @property
    def identity(self) -> str:
        return _digest(identity_of(self.source).encode() + np.ascontiguousarray(self.indices, np.int64).tobytes())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.source[int(self.indices[index])]


def identity_of(examples: Sequence[Example]) -> str:
    """Which examples these are, for the token cache's key: the sequence's own `identity` (stored
    datasets are content-addressed: their ids and a split's indices say it), else a hash of them all."""
    own = getattr(examples, "identity", None)
    if own is not None:
        return str(own)
    return _digest("".join(repr(e) for e in examples).encode())


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def line_spans(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of every non-blank line, found with numpy a chunk at a time."""
    starts, ends = [], []
    base, start = 0, 0
    with path.open("rb") as fh:
        while chunk := fh.read(SCAN_CHUNK):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + base
            line_starts = np.concatenate(([start], newlines[:-1] + 1)) if len(newlines) else np.zeros(0, np.int64)
            starts.append(line_starts)
            ends.append(newlines)
            if len(newlines):
                start = int(newlines[-1]) + 1
            base += len(chunk)
    if start < base:  # a last line without its newline
        starts.append(np.array([start]))
        ends.append(np.array([base]))
    begin = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
    end = np.concatenate(ends).astype(np.int64) if ends else np.zeros(0, np.int64)
    # Blank lines hold no record. Only short lines can be blank in practice (a CRLF file's "\r",
    # stray spaces): those are read back and checked; a longer line is a record or a JSON error.
    keep = (end - begin) > 0
    with path.open("rb") as fh:
        if len(begin) and fh.read(3) == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark before the first record
            begin[0] = 3
        for index in np.flatnonzero((end - begin) < 16):
            fh.seek(int(begin[index]))
            keep[index] = bool(fh.read(int(end[index] - begin[index])).strip())
    return begin[keep], end[keep]


def fetch(dataset_id: str, cache: Path, download: Callable[[Path], None], keep: int = KEEP_DATASETS) -> DatasetFile:
    """The dataset as a local JSONL file: from the node's cache, else downloaded (atomically) into it."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{dataset_id}.jsonl"
    if not path.exists():
        fd, name = tempfile.mkstemp(dir=cache, suffix=".part")
        os.close(fd)
        part = Path(name)
        try:
            download(part)
            if detect(part, "", SourceOptions()).kind == "json":
                _array_to_jsonl(part)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        keep_newest(list(cache.glob("*.jsonl")), keep, path)
        for part in cache.glob("*.part"):  # a download a killed worker left
            if time.time() - part.stat().st_mtime > 3600:
                part.unlink(missing_ok=True)
    else:
        os.utime(path)  # recently used
    return DatasetFile(path)


def _array_to_jsonl(path: Path) -> None:
    """A stored JSON array as JSONL, one element at a time (sources.py's streaming reader)."""
    converted = path.with_suffix(".jsonl.part")
    with converted.open("w", encoding="utf-8") as out:
        for _, record in detect(path, "", SourceOptions()).records():
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(converted, path)


def keep_newest(entries: list[Path], keep: int, current: Path) -> None:
    """A node cache's policy: the `keep` most recently used entries (files or folders) stay, and the
    one in use now whatever its age; the rest are removed."""
    for stale in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        if stale == current:
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def split_indices(n: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) record indices: a seeded share of `n` held out (a fraction, or a count when >= 1),
    stable for a seed."""
    order = np.random.default_rng(seed).permutation(n)
    if validation_split >= 1:
        n_eval = min(int(validation_split), n - 1)
    else:
        n_eval = max(1, int(n * validation_split)) if validation_split and n > 1 else 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])
