"""The training stream: one window tokenized for the first batch, every example once an epoch,
the same batches from the cache, across processes and after a resume."""

from __future__ import annotations

import pytest
import torch

from services.trainer.data.records import Example
from services.trainer.worker.training.formatting import IGNORE, Tokenized
from services.trainer.worker.training.stream import TokenCache, TokenStream


def _examples(n: int) -> list[Example]:
    return [Example(text=str(i)) for i in range(n)]


class Counting:
    """A tokenizer stand-in: example i becomes 5 + i % 40 tokens whose ids all equal i (100, cut to
    64, when i % 50 == 1; left out when i % 97 == 0), and the calls are counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, example: Example) -> Tokenized | None:
        self.calls += 1
        i = int(example.text)
        if i % 97 == 0:
            return None
        full = 100 if i % 50 == 1 else 5 + i % 40  # every 50th is longer than max_len 64: cut
        ids = [i] * min(full, 64)
        return Tokenized(ids, [IGNORE, *ids[1:]], full)


def _stream(examples, tokenize, cache_root, world_size=1, rank=0, **overrides):
    def my_rows(n: int) -> slice:
        per = n // world_size
        return slice(rank * per, (rank + 1) * per)

    settings = {"seed": 3, "max_len": 64, "packing": True, "pad_id": 0, "rows_per_batch": 4, "window": 256}
    return TokenStream(
        examples,
        tokenize,
        TokenCache(cache_root, "key"),
        world_size=world_size,
        my_rows=my_rows,
        **settings | overrides,
    )


def _ids(batch) -> set[int]:
    return set(batch.input_ids.unique().tolist())


def test_the_first_batch_tokenizes_one_window_not_the_dataset(tmp_path):
    tokenize = Counting()
    stream = _stream(_examples(10_000), tokenize, tmp_path)
    batch = stream.batch(0)
    assert tokenize.calls == 256 and batch.input_ids.shape[0] == 1 and batch.input_ids.shape[1] <= 4 * 64
    assert stream.epochs_at(0) < 0.1


def test_an_epoch_holds_every_learnable_example_once_then_a_new_order(tmp_path):
    examples = _examples(1000)
    stream = _stream(examples, Counting(), tmp_path)
    per_epoch = stream.batches_in_epoch(0)
    seen = [i for b in range(per_epoch) for i in _ids(stream.batch(b))]
    assert sorted(seen) == [i for i in range(1000) if i % 97]
    assert stream.epochs_at(per_epoch - 1) == pytest.approx(1.0)
    second = [sorted(_ids(stream.batch(per_epoch + b))) for b in range(3)]
    assert second != [sorted(_ids(stream.batch(b))) for b in range(3)]  # epoch 2 is shuffled anew


def test_a_second_stream_reads_the_same_batches_from_the_cache(tmp_path):
    first = _stream(_examples(1000), Counting(), tmp_path)
    batches = [first.batch(i) for i in range(40)]
    tokenize, notices = Counting(), []
    again = _stream(_examples(1000), tokenize, tmp_path, notice=notices.append)
    for i, batch in enumerate(batches):
        assert torch.equal(again.batch(i).input_ids, batch.input_ids)
    assert tokenize.calls == 0 and again.cached > 0
    assert any("tokens from the cache" in n for n in notices)


def test_two_processes_split_each_global_batch_between_them(tmp_path):
    examples = _examples(600)
    ranks = [
        _stream(examples, Counting(), tmp_path / f"rank{r}", world_size=2, rank=r, rows_per_batch=2) for r in range(2)
    ]
    # rows_per_batch 2 on each of two ranks is the global batch of 4 rows of one process's stream.
    single = _stream(examples, Counting(), tmp_path / "single", rows_per_batch=4)
    for b in range(10):
        assert _ids(ranks[0].batch(b)) | _ids(ranks[1].batch(b)) == _ids(single.batch(b))
        assert not _ids(ranks[0].batch(b)) & _ids(ranks[1].batch(b))


def test_unpacked_streams_pad_rows(tmp_path):
    stream = _stream(_examples(300), Counting(), tmp_path, packing=False)
    batch = stream.batch(0)
    assert batch.input_ids.shape[0] == 4 and batch.attention_mask is not None


def test_a_stream_with_nothing_to_learn_says_so(tmp_path):
    stream = _stream([Example(text="0"), Example(text="97")], Counting(), tmp_path)
    with pytest.raises(ValueError, match="no training example has a token to learn from"):
        stream.batch(0)


def test_what_tokenizing_found_is_counted_and_said_once(tmp_path):
    notices = []
    stream = _stream(_examples(1000), Counting(), tmp_path, notice=notices.append)
    stream.batches_in_epoch(0)
    assert (stream.seen, stream.truncated, stream.dropped) == (1000, 20, 11)
    (said,) = [n for n in notices if n.startswith("tokens per example")]
    assert "max 100;" in said and "cut at max_seq_length=64" in said
    # Read back from the cache, the counts are the same.
    again = _stream(_examples(1000), Counting(), tmp_path)
    again.batches_in_epoch(0)
    assert (again.seen, again.truncated, again.dropped) == (1000, 20, 11)
