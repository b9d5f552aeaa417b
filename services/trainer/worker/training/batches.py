"""Token storage and batches, built lazily: memory does not grow with the dataset.

Tokenized examples go to two flat int32 files (ids, labels) read through memory maps, plus one
offset per example; a batch's tensors exist only while its step runs. The plan of which
examples form each global batch is computed once from the lengths alone.

Packing is padding-free: a micro-batch's examples are laid end to end in one row, and
`position_ids` restart at 0 for each example. transformers reads restarting positions as
packed sequences: FlashAttention runs variable-length attention over them, and the SDPA and
eager paths build a block-diagonal mask inside the model (per layer, so sliding windows still
apply), so neither attention nor the loss crosses an example and no mask is stored.
Unpacked batches are padded rows with a 2-D padding mask.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.trainer.worker.training.formatting import IGNORE, Tokenized


@dataclass
class TokenStore:
    """Every example's ids and labels (int32, memory-mapped from disk) and where each starts."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray  # int64, len(examples) + 1

    @classmethod
    def build(cls, tokenized: Iterable[Tokenized], directory: Path) -> TokenStore:
        directory.mkdir(parents=True, exist_ok=True)
        offsets = [0]
        with (directory / "ids.bin").open("wb") as ids_file, (directory / "labels.bin").open("wb") as labels_file:
            for example in tokenized:
                ids_file.write(np.asarray(example.input_ids, dtype=np.int32).tobytes())
                labels_file.write(np.asarray(example.labels, dtype=np.int32).tobytes())
                offsets.append(offsets[-1] + len(example.input_ids))
        np.save(directory / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        return cls.load(directory)

    @classmethod
    def load(cls, directory: Path) -> TokenStore:
        """A store `build` wrote, memory-mapped (the token cache reads windows back this way)."""
        offsets = np.load(directory / "offsets.npy")
        total = int(offsets[-1])

        def mapped(name: str) -> np.ndarray:
            if total == 0:
                return np.zeros(0, dtype=np.int32)
            return np.memmap(directory / name, dtype=np.int32, mode="r", shape=(total,))

        return cls(mapped("ids.bin"), mapped("labels.bin"), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.ids[start:end], self.labels[start:end]


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # 2-D padding mask; None when packed (positions tell the examples apart)
    real_tokens: int

    @property
    def loss_tokens(self) -> int:
        """Tokens the loss covers (the label of position t is predicted at t - 1)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(
            self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device), mask, self.real_tokens
        )

    def model_inputs(self) -> dict:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "labels": self.labels}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


PACK_WINDOW = 4096
"""Examples packed together at most: best-fit over a window, as TRL's `bfd` packs a map batch."""


def pack_rows(lengths: list[int], max_len: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Best-fit decreasing, window by window: the longest example first, each into the row whose
    free space it fills best, a new row when none has room. Rows come out fuller than in-order
    greedy packing (on alpaca-like data at max length 512: ~508 tokens a row, against ~400),
    so an epoch takes fewer steps for the same tokens. Examples keep their order within a row."""
    rows: list[list[int]] = []
    for start in range(0, len(lengths), window):
        rows += _best_fit_decreasing(lengths, range(start, min(start + window, len(lengths))), max_len)
    return rows


def _best_fit_decreasing(lengths: list[int], indices: range, max_len: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first with room
    for index in sorted(indices, key=lambda i: -lengths[i]):
        n = lengths[index]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_len, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return [sorted(row) for row in rows]


def packed_batch(store: TokenStore, rows: list[list[int]]) -> Batch:
    """One row holding every example of `rows` end to end, positions restarting per example."""
    examples = [store.example(i) for row in rows for i in row]
    ids = np.concatenate([e[0] for e in examples])
    labels = np.concatenate([e[1] for e in examples])
    positions = np.concatenate([np.arange(len(e[0])) for e in examples])
    as_row = lambda a: torch.from_numpy(a.astype(np.int64)).unsqueeze(0)  # noqa: E731
    return Batch(as_row(ids), as_row(labels), as_row(positions), None, len(ids))


def padded_batch(store: TokenStore, rows: list[list[int]], pad_id: int) -> Batch:
    """One example per row, padded to the longest, with a 2-D padding mask."""
    examples = [store.example(i) for row in rows for i in row]
    width = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (e_ids, e_labels) in enumerate(examples):
        n = len(e_ids)
        ids[row, :n] = torch.from_numpy(e_ids.astype(np.int64))
        labels[row, :n] = torch.from_numpy(e_labels.astype(np.int64))
        mask[row, :n] = 1
        positions[row, :n] = torch.arange(n)
    return Batch(ids, labels, positions, mask, int(mask.sum()))


@dataclass
class BatchPlan:
    """Which examples form each global batch, and this process's share of its rows.

    Every process computes the same plan (global batches of `rows_per_batch x world_size`
    rows), so the split does not depend on the number of processes; a last global batch with
    fewer rows than processes is dropped (every process must take part in every step).
    """

    store: TokenStore
    batches: list[list[list[int]]]  # global batch -> this process's rows -> example indices
    packed: bool
    pad_id: int

    @classmethod
    def build(
        cls,
        store: TokenStore,
        rows_per_batch: int,
        max_len: int,
        packing: bool,
        pad_id: int,
        world_size: int = 1,
        my_rows: Callable[[int], slice] = lambda n: slice(0, n),
    ) -> BatchPlan:
        lengths = [store.length(i) for i in range(len(store))]
        rows = pack_rows(lengths, max_len) if packing else [[i] for i in range(len(lengths))]
        return cls(store, my_share(rows, rows_per_batch, world_size, my_rows), packing, pad_id)

    def __len__(self) -> int:
        return len(self.batches)

    def batch(self, index: int) -> Batch:
        rows = self.batches[index]
        return packed_batch(self.store, rows) if self.packed else padded_batch(self.store, rows, self.pad_id)


def my_share(
    rows: list[list[int]], rows_per_batch: int, world_size: int, my_rows: Callable[[int], slice]
) -> list[list[list[int]]]:
    """Rows cut into global batches of `rows_per_batch x world_size`, and this process's rows of each;
    a global batch with fewer rows than processes is dropped (every process must take part in every step)."""
    size = rows_per_batch * world_size
    global_batches = [rows[i : i + size] for i in range(0, len(rows), size)]
    return [b[my_rows(len(b))] for b in global_batches if len(b) >= world_size]
