"""The worker's datasets on disk: offsets found right whatever the line endings, records parsed on
access equal to parsing the whole file, one download per node, stable seeded splits."""

from __future__ import annotations

import json

import numpy as np

from services.trainer.data.records import parse_dataset
from services.trainer.worker.dataset_files import Concatenated, DatasetFile, Subset, fetch, line_spans, split_indices
from tests.trainer.conftest import memorization_jsonl


def test_line_spans_skip_blank_lines_crlf_a_bom_and_a_missing_last_newline(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n\n{"text": "b"}\n  \n{"text": "c"}')
    starts, ends = line_spans(path)
    data = path.read_bytes()
    assert [json.loads(data[s:e]) for s, e in zip(starts, ends, strict=True)] == [
        {"text": "a"},
        {"text": "b"},
        {"text": "c"},
    ]


def test_records_on_access_equal_parsing_the_whole_file(tmp_path):
    path = tmp_path / "ds-abc.jsonl"
    path.write_bytes(memorization_jsonl(40))
    file = DatasetFile(path)
    whole = parse_dataset(path.read_bytes()).examples
    assert len(file) == 40 and file.format == "alpaca" and file.identity == "ds-abc"
    assert [file[i] for i in range(40)] == whole and file[3:6] == whole[3:6]
    both = Concatenated([file, file])
    assert len(both) == 80 and both[45] == whole[5]
    subset = Subset(both, np.array([79, 0]))
    assert list(subset) == [whole[39], whole[0]]
    assert subset.identity != Subset(both, np.array([0, 79])).identity  # the order is part of what it holds


def test_a_dataset_is_downloaded_once_per_node_and_arrays_become_jsonl(tmp_path):
    calls = []

    def download(target):
        calls.append(target)
        target.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2))

    first = fetch("ds-1", tmp_path / "cache", download)
    again = fetch("ds-1", tmp_path / "cache", download)
    assert len(calls) == 1 and [e.text for e in again] == ["one", "two"] == [e.text for e in first]
    assert (tmp_path / "cache" / "ds-1.jsonl").read_text() == '{"text": "one"}\n{"text": "two"}\n'
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["ds-1.jsonl"]  # no partial files left


def test_only_the_most_recently_used_datasets_are_kept(tmp_path):
    for i in range(4):
        fetch(f"ds-{i}", tmp_path, lambda target: target.write_text('{"text": "x"}\n'), keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["ds-2.jsonl", "ds-3.jsonl"]


def test_splits_are_seeded_disjoint_and_cover_every_record():
    train, held_out = split_indices(1000, 0.1, seed=7)
    assert len(held_out) == 100 and len(train) == 900
    assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(1000))
    assert np.array_equal(held_out, split_indices(1000, 0.1, seed=7)[1])
    assert not np.array_equal(held_out, split_indices(1000, 0.1, seed=8)[1])
    assert len(split_indices(1, 0.25, seed=0)[1]) == 0  # one record stays for training
    by_count = split_indices(1000, 30, seed=7)
    assert len(by_count[1]) == 30 and len(by_count[0]) == 970
    assert len(split_indices(10, 50, seed=7)[0]) == 1  # a count past the data leaves one to train on
