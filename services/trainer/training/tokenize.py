"""Turn examples into token ids with a loss mask, and into (packed) batches.

Chat examples go through the tokenizer's own chat template; the loss covers assistant
tokens only. Spans are found by rendering the conversation prefix by prefix, which works
for any template that renders a prefix of the conversation as a prefix of the text.
Packing concatenates examples into rows of `max_len` and gives each row a block-diagonal
causal mask and per-example positions, so neither attention nor loss crosses an example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.trainer.data.records import Example

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def tokenize_example(tokenizer, example: Example, max_len: int) -> Tokenized:
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        labels = list(ids)
    else:
        ids = _render(tokenizer, example.messages, add_generation_prompt=False)
        labels = [IGNORE] * len(ids)
        for i, (role, _) in enumerate(example.messages):
            if role != "assistant":
                continue
            start = len(_render(tokenizer, example.messages[:i], add_generation_prompt=True))
            end = len(_render(tokenizer, example.messages[: i + 1], add_generation_prompt=False))
            labels[start:end] = ids[start:end]
        # Templates often end an assistant turn with a newline after the end token: no loss on it.
        if labels and labels[-1] != IGNORE and tokenizer.decode([labels[-1]]).strip() == "":
            labels[-1] = IGNORE
    ids, labels = ids[:max_len], labels[:max_len]
    labels[0] = IGNORE  # nothing predicts the first token (and in a packed row it must not see the previous example)
    return Tokenized(ids, labels)


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor  # 2-D padding mask, or a 4-D boolean block-diagonal mask when packed
    position_ids: torch.Tensor
    row_tokens: tuple[int, ...]  # real (non-padding) tokens per row

    @property
    def real_tokens(self) -> int:
        return sum(self.row_tokens)

    @property
    def rows(self) -> int:
        return len(self.row_tokens)

    @property
    def loss_tokens(self) -> int:
        """Tokens the loss covers (labels are shifted by one inside the model)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.row_tokens,
        )

    def select(self, rows: slice) -> Batch:
        """Some rows of the batch (one process's share of a global batch)."""
        return Batch(
            self.input_ids[rows],
            self.labels[rows],
            self.attention_mask[rows],
            self.position_ids[rows],
            self.row_tokens[rows],
        )

    def model_inputs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "labels": self.labels,
        }


def pad_batch(examples: list[Tokenized], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        positions[row, :n] = torch.arange(n)
    return Batch(ids, labels, mask, positions, tuple(int(n) for n in mask.sum(dim=1)))


def pack_rows(examples: list[Tokenized], max_len: int) -> list[list[Tokenized]]:
    """Greedy first-fit into rows of at most `max_len` tokens, in order."""
    rows: list[list[Tokenized]] = []
    current: list[Tokenized] = []
    used = 0
    for e in examples:
        if current and used + len(e.input_ids) > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(e)
        used += len(e.input_ids)
    if current:
        rows.append(current)
    return rows


def packed_batch(rows: list[list[Tokenized]], pad_id: int) -> Batch:
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    for r, row in enumerate(rows):
        offset = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, offset : offset + n] = torch.tensor(e.input_ids)
            labels[r, offset : offset + n] = torch.tensor(e.labels)
            positions[r, offset : offset + n] = torch.arange(n)
            allowed[r, 0, offset : offset + n, offset : offset + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            offset += n
        # Padding rows attend to themselves only, so softmax never sees an all-masked row.
        for p in range(offset, width):
            allowed[r, 0, p, p] = True
    # A boolean mask (True = may attend) suits SDPA whatever the query dtype (fp32, bf16 autocast, QLoRA).
    return Batch(ids, labels, allowed, positions, tuple(sum(len(e.input_ids) for e in row) for row in rows))
