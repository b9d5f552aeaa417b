"""Training batches as a stream, tokenized a window at a time: the first step waits for one window.

Each epoch visits the training examples in a fresh seeded order, cut into windows of
PACK_WINDOW examples. A window is tokenized when the steps reach it (or read back from the
token cache), packed best-fit (batches.pack_rows), and cut into global batches of
`rows_per_batch x world_size` rows, of which each process takes its share. So a 20-step job on
a million records tokenizes one window, not a million records; a job given epochs instead of
max_steps tokenizes its first epoch up front, since its step count depends on how that packs.
The stream is a pure function of (examples, seed, settings): every process, every attempt and
a resumed run see the same batches, and the cache holds windows under a key of all of them.

Token cache: one folder per key (the examples' content, the tokenizer and chat template, max
length, packing, seed, window size) under the node's cache root, one subfolder per window
written whole and renamed into place; the least recently used keys beyond KEEP_KEYS are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.trainer.data.records import Example
from services.trainer.worker.dataset_files import keep_newest
from services.trainer.worker.training.batches import (
    PACK_WINDOW,
    Batch,
    TokenStore,
    my_share,
    pack_rows,
    packed_batch,
    padded_batch,
)
from services.trainer.worker.training.formatting import Tokenized

KEEP_KEYS = 8
CACHE_VERSION = 2  # bump when tokenization or packing changes what a window holds
PROGRESS_EVERY_S = 10.0


@dataclass
class Window:
    """One window's tokens and rows (row = indices into `store`), and what tokenizing it found."""

    store: TokenStore
    rows: list[list[int]]
    dropped: int
    """Examples left out: no token to learn from within max_seq_length."""
    truncated: int
    """Examples cut at max_seq_length (kept, with what fits)."""
    examples: int
    """Examples the window holds, kept or not."""


class TokenCache:
    """Tokenized windows of one stream key on disk, under the node's cache root."""

    def __init__(self, root: Path, key: str) -> None:
        self.folder = root / key
        self.folder.mkdir(parents=True, exist_ok=True)
        os.utime(self.folder)
        keep_newest([p for p in root.iterdir() if p.is_dir()], KEEP_KEYS, self.folder)

    def load(self, name: str) -> Window | None:
        folder = self.folder / name
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None  # not written yet (or by a killed process, before its rename: then never)
        return Window(TokenStore.load(folder), meta["rows"], meta["dropped"], meta["truncated"], meta["examples"])

    def save(
        self,
        name: str,
        tokenized: list[Tokenized],
        rows: list[list[int]],
        *,
        dropped: int,
        truncated: int,
        examples: int,
    ) -> Window:
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{name}-"))
        TokenStore.build(tokenized, staging)
        meta = {"rows": rows, "dropped": dropped, "truncated": truncated, "examples": examples}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(staging, self.folder / name)
        except OSError:  # another process of the job wrote the same window first: identical bytes
            shutil.rmtree(staging, ignore_errors=True)
        window = self.load(name)
        if window is None:
            raise RuntimeError(f"the token cache lost window {name} as it was written ({self.folder})")
        return window


def stream_key(identity: dict, examples_digest: str) -> str:
    payload = json.dumps({"version": CACHE_VERSION, "examples": examples_digest, **identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class TokenStream:
    """Global batches in stream order, this process's rows of each; `batch(i)` tokenizes as needed."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokenize: Callable[[Example], Tokenized | None],
        cache: TokenCache,
        *,
        seed: int,
        max_len: int,
        packing: bool,
        pad_id: int,
        rows_per_batch: int,
        world_size: int = 1,
        my_rows: Callable[[int], slice] = lambda n: slice(0, n),
        window: int = PACK_WINDOW,
        notice: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.examples, self.tokenize, self.cache = examples, tokenize, cache
        self.seed, self.max_len, self.packing, self.pad_id = seed, max_len, packing, pad_id
        self.rows_per_batch, self.world_size, self.my_rows = rows_per_batch, world_size, my_rows
        self.window, self.notice = window, notice
        self.windows_per_epoch = -(-len(examples) // window)
        # Realized windows in stream order: (epoch, window, first global batch, batches).
        self.spans: list[tuple[int, int, int, int]] = []
        self._current: tuple[tuple[int, int], Window, list[list[list[int]]]] | None = None
        self._orders: dict[int, np.ndarray] = {}
        self.seen = self.dropped = self.truncated = 0
        """Examples of the windows realized, in epoch 0 (each once), and how many were left out or cut."""
        self.tokenized = 0
        """Examples tokenized by this stream (windows read from the cache not counted)."""
        self.cached = 0
        """Windows read back from the cache."""

    # ------------------------------------------------------------------------------ public

    def batch(self, index: int) -> Batch:
        """Global batch `index` of the stream (epochs follow each other), this process's rows of it."""
        span = self._span_of(index)
        epoch, number, first, _ = span
        window, batches = self._realize(epoch, number)
        rows = batches[index - first]
        if self.packing:
            return packed_batch(window.store, rows)
        return padded_batch(window.store, rows, self.pad_id)

    def batches_in_epoch(self, epoch: int = 0) -> int:
        """Global batches of an epoch (tokenizes the whole epoch: what a job given epochs must know)."""
        started, last = time.monotonic(), time.monotonic()
        for number in range(self.windows_per_epoch):
            self._ensure_span(epoch, number)
            if time.monotonic() - last > PROGRESS_EVERY_S:
                done = min(len(self.examples), (number + 1) * self.window)
                rate = done / (time.monotonic() - started)
                self.notice(f"tokenizing {done:,} of {len(self.examples):,} examples ({rate:,.0f}/s)")
                last = time.monotonic()
        return sum(n for e, _, _, n in self.spans if e == epoch)

    def epochs_at(self, index: int) -> float:
        """How many epochs the stream has gone through once batch `index` is done (a fraction)."""
        epoch, number, first, n = self._span_of(max(index, 0))
        return epoch + (number + (index - first + 1) / max(n, 1)) / max(self.windows_per_epoch, 1)

    # ------------------------------------------------------------------------------ stream

    def _span_of(self, index: int) -> tuple[int, int, int, int]:
        while not self.spans or self.spans[-1][2] + self.spans[-1][3] <= index:
            epoch, number = self._next_window()
            if epoch > 0 and number == 0 and not any(n for e, _, _, n in self.spans if e == epoch - 1):
                raise ValueError(
                    "no training example has a token to learn from after truncation (raise max_seq_length), "
                    "or fewer examples than processes"
                )
            self._ensure_span(epoch, number)
        for span in reversed(self.spans):
            if span[2] <= index < span[2] + span[3]:
                return span
        raise IndexError(index)

    def _next_window(self) -> tuple[int, int]:
        if not self.spans:
            return 0, 0
        epoch, number = self.spans[-1][:2]
        return (epoch, number + 1) if number + 1 < self.windows_per_epoch else (epoch + 1, 0)

    def _ensure_span(self, epoch: int, number: int) -> None:
        if any(e == epoch and w == number for e, w, _, _ in self.spans):
            return
        if (epoch, number) != self._next_window():
            raise RuntimeError(f"window {epoch}/{number} asked out of order")
        _, batches = self._realize(epoch, number)
        first = self.spans[-1][2] + self.spans[-1][3] if self.spans else 0
        self.spans.append((epoch, number, first, len(batches)))

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
        return self._orders[epoch]

    def _realize(self, epoch: int, number: int) -> tuple[Window, list[list[list[int]]]]:
        if self._current is not None and self._current[0] == (epoch, number):
            return self._current[1], self._current[2]
        name = f"e{epoch}-w{number}"
        window = self.cache.load(name)
        if window is None:
            window = self._tokenize_window(epoch, number, name)
        else:
            self.cached += 1
            if self.cached == 1:
                self.notice(
                    f"tokens from the cache: an earlier run tokenized these examples ({self.cache.folder.name})"
                )
        if epoch == 0 and not any(e == 0 and w == number for e, w, _, _ in self.spans):
            self.seen += window.examples
            self.dropped += window.dropped
            self.truncated += window.truncated
        mine = my_share(window.rows, self.rows_per_batch, self.world_size, self.my_rows)
        self._current = ((epoch, number), window, mine)
        return window, mine

    def _tokenize_window(self, epoch: int, number: int, name: str) -> Window:
        indices = self._order(epoch)[number * self.window : (number + 1) * self.window]
        kept: list[Tokenized] = []
        dropped = truncated = 0
        for index in indices:
            tokenized = self.tokenize(self.examples[int(index)])
            if tokenized is None:
                dropped += 1
            else:
                kept.append(tokenized)
                truncated += tokenized.full_length > self.max_len
        lengths = [len(t.input_ids) for t in kept]
        if self.packing:
            rows = pack_rows(lengths, self.max_len, window=len(lengths) or 1)
        else:
            rows = [[i] for i in range(len(kept))]
        self.tokenized += len(indices)
        if epoch == 0 and number == 0 and kept:
            full = np.array([t.full_length or len(t.input_ids) for t in kept])
            p50, p95 = np.percentile(full, [50, 95])
            self.notice(
                f"tokens per example (first {len(indices):,}): p50 {p50:.0f}, p95 {p95:.0f}, max {full.max()}; "
                f"{truncated} cut at max_seq_length={self.max_len}, {dropped} left out (no assistant token "
                "within it)"
            )
        return self.cache.save(name, kept, rows, dropped=dropped, truncated=truncated, examples=len(indices))


def tokenizer_identity(tokenizer) -> str:
    """What decides the tokens: the vocabulary and merges, the special tokens, the chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return digest.hexdigest()
