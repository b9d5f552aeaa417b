"""Every kind of dataset source, made here with the libraries that write them (pyarrow, `datasets`),
read record by record, validated, and refused with the position of what is wrong; then through
the real trainer server: a folder uploaded by the SDK as one dataset, and a job trained on Parquet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.trainer.data.records import parse_dataset, validate_records
from services.trainer.data.sources import SourceOptions, detect
from tests.trainer.conftest import memorization_jsonl
from tunedock.errors import InvalidArgument
from tunedock.v1 import trainer_pb2 as pb

ALPACA = [json.loads(line) for line in memorization_jsonl().decode().splitlines()]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": str(2 * i)},
        ]
    }
    for i in range(6)
]


def read(path: Path, **options) -> tuple[str, list[dict], list[str]]:
    """(format, the records as validated, where each was found)."""
    records, places = [], []

    def keep(_, record):
        records.append(record)

    found = validate_records(
        ((places.append(w) or w, r) for w, r in detect(path, path.name, SourceOptions(**options)).records()),
        keep=keep,
    )
    assert found.num_records == len(records)
    return found.format, records, places


def refused(path: Path, **options) -> str:
    with pytest.raises(InvalidArgument) as info:
        read(path, **options)
    return info.value.message


# ------------------------------------------------------------------------------ files


def test_jsonl_and_a_json_array_stream_record_by_record(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(memorization_jsonl())
    fmt, records, places = read(jsonl)
    assert fmt == "alpaca" and records == ALPACA and places[:2] == ["line 1", "line 2"]
    array = tmp_path / "data.json"
    # Pretty-printed over many lines, as json.dump(indent=2) writes it; a number last in a chunk.
    array.write_text(json.dumps(ALPACA, indent=2))
    assert read(array)[1] == ALPACA
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"text": "x" * 700_000, "id": i} for i in range(4)]))  # records span 1 MiB chunks
    assert [r["id"] for r in read(big)[1]] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"text": "a"}, {"text": 1}]', "record 1: field 'text' must be a non-empty string"),
        ('[{"text": "a"} {"text": "b"}]', "the JSON array does not parse after record 0: expected ','"),
        ('[{"text": "a"}, {"text": "b"', "record 1: not valid JSON"),
        ('[{"text": "a"},', "the JSON array is not closed with ']' (after record 0)"),
    ],
)
def test_a_broken_json_array_is_refused_at_its_record(tmp_path, text, message):
    path = tmp_path / "broken.json"
    path.write_text(text)
    assert refused(path).startswith(message)


def test_parquet_with_nested_chat_columns_reads_as_the_jsonl_would(tmp_path):
    path = tmp_path / "chat.parquet"
    # Struct columns fill absent fields with nulls (tool_calls here): they must not reach the validator.
    rows = [*CHATS, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, path, row_group_size=4)
    fmt, records, places = read(path)
    assert fmt == "chat" and records == rows
    assert places[3:5] == ["row group 0, row 3", "row group 1, row 0"]


def test_parquet_refusals_name_the_row_group_and_row(tmp_path):
    path = tmp_path / "bad.parquet"
    rows = [*ALPACA[:5], {"instruction": "Say hi", "input": "", "output": ""}]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    assert refused(path) == "row group 1, row 1: field 'output' must be a non-empty string"
    dpo = tmp_path / "dpo.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "chosen": "b", "rejected": "c"}]), dpo)
    assert "column 'chosen' holds preference data" in refused(dpo)
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(path.read_bytes()[:200])
    assert refused(truncated).startswith("the Parquet file cannot be read")


def test_csv_and_tsv_with_a_json_history_cell(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["instruction", "input", "output", "history"])
        writer.writeheader()
        writer.writerow({"instruction": "Name a colour", "output": "Teal, with a\nnewline", "history": ""})
        writer.writerow({"instruction": "And another", "output": "Red", "history": json.dumps([["Hi", "Hello"]])})
    fmt, records, places = read(path)
    assert fmt == "alpaca" and records[0] == {"instruction": "Name a colour", "output": "Teal, with a\nnewline"}
    assert records[1]["history"] == [["Hi", "Hello"]]
    assert places == ["row 1 (line 2)", "row 2 (line 4)"]  # the first row's cell spans two lines
    tsv = tmp_path / "data.tsv"
    tsv.write_text("text\nfirst\nsecond\n")
    assert read(tsv)[1] == [{"text": "first"}, {"text": "second"}]
    unnamed = tmp_path / "export.txt"  # no extension to go by: the header line says CSV
    unnamed.write_text("instruction,output\nhi,there\n")
    assert read(unnamed)[1] == [{"instruction": "hi", "output": "there"}]
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,output\na,b\nc,d,e\n")
    assert refused(ragged) == "row 2 (line 3): 3 cells for 2 columns (instruction, output)"


def test_arrow_files_and_streams(tmp_path):
    table = pa.Table.from_pylist(ALPACA)
    stream, file = tmp_path / "data.arrow", tmp_path / "file.arrow"
    with pa.ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    with pa.ipc.new_file(file, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    assert read(stream)[1] == ALPACA and read(file)[1] == ALPACA
    assert read(stream)[2][4] == "row 4"


# ------------------------------------------------------------------------------ folders


def test_a_datasets_save_to_disk_directory_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ALPACA).save_to_disk(tmp_path / "one", num_shards=2)
    fmt, records, places = read(tmp_path / "one")
    assert fmt == "alpaca" and records == ALPACA and places[0] == "shard data-00000-of-00002.arrow: row 0"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ALPACA), "test": datasets.Dataset.from_list(ALPACA[:2])}
    ).save_to_disk(tmp_path / "dict")
    assert read(tmp_path / "dict")[1] == ALPACA
    assert read(tmp_path / "dict", split="test")[1] == ALPACA[:2]
    assert refused(tmp_path / "dict", split="validation") == (
        "the DatasetDict has no split 'validation'; its splits: train, test (--split)"
    )


def test_a_folder_of_parquet_shards_reads_in_name_order_and_names_the_bad_shard(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(ALPACA[:4]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ALPACA[4:]), folder / "train-00001-of-00002.parquet")
    assert read(folder)[1] == ALPACA
    pq.write_table(pa.Table.from_pylist([{"instruction": "x"}]), folder / "train-00002-of-00002.parquet")
    assert refused(folder) == (
        "shard train-00002-of-00002.parquet: row group 0, row 0: field 'output' must be a non-empty string"
    )
    (folder / "extra.jsonl").write_text("{}\n")
    assert "mixes data files of several kinds (.jsonl, .parquet)" in refused(folder)


def llama_factory_folder(root: Path) -> Path:
    """A LLaMA-Factory data folder: mapped alpaca columns, an OpenAI-style sharegpt entry, a sampled one."""
    root.mkdir()
    mapped = [{"question": r["instruction"], "answer": r["output"], "id": i} for i, r in enumerate(ALPACA)]
    pq.write_table(pa.Table.from_pylist(mapped), root / "qa.parquet")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    info = {
        "qa": {"file_name": "qa.parquet", "columns": {"prompt": "question", "response": "answer"}},
        "chats": {
            "file_name": "chats.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        },
        "chats_x10": {"file_name": "chats.jsonl", "formatting": "sharegpt", "num_samples": 10,
                      "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}},
        "alpaca_hub": {"hf_hub_url": "tatsu-lab/alpaca"},
    }  # fmt: skip
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return root


def test_a_llama_factory_folder_maps_columns_and_tags_onto_the_formats(tmp_path):
    folder = llama_factory_folder(tmp_path / "lf")
    fmt, records, _ = read(folder, dataset="qa")
    assert fmt == "alpaca" and records == [
        {"instruction": r["instruction"], "output": r["output"], "id": i} for i, r in enumerate(ALPACA)
    ]
    fmt, records, places = read(folder, dataset="chats")
    assert fmt == "chat" and places[0] == "line 1"
    assert records[1]["conversations"] == [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "What is 1 plus 1?"},
        {"from": "gpt", "value": "2"},
    ]
    # num_samples past the size: every record, then a seeded draw; the same draw every time.
    sampled = read(folder, dataset="chats_x10")[1]
    assert len(sampled) == 10 and sampled == read(folder, dataset="chats_x10")[1]
    assert {json.dumps(r) for r in sampled} == {json.dumps(r) for r in read(folder, dataset="chats")[1]}


def test_llama_factory_refusals_say_what_to_fix(tmp_path):
    folder = llama_factory_folder(tmp_path / "lf")
    assert refused(folder) == (
        "the folder describes 3 local datasets (chats, chats_x10, qa); name one (tunedock data upload FOLDER "
        "--dataset NAME)"
    )
    assert refused(folder, dataset="nope").startswith("dataset_info.json has no dataset 'nope'; it has alpaca_hub")
    assert "read from elsewhere (hf_hub_url)" in refused(folder, dataset="alpaca_hub")
    info = json.loads((folder / "dataset_info.json").read_text())
    info["qa"]["columns"]["images"] = "pictures"
    info["chats"]["tags"]["user_tag"] = "human"  # the file says "user": not an allowed role any more
    info["ranked"] = {"file_name": "qa.parquet", "ranking": True}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    assert "column 'images' holds images" in refused(folder, dataset="qa")
    assert refused(folder, dataset="chats") == (
        "line 1: message 1 has role 'user'; the entry's tags allow human, assistant, observation, function_call, system"
    )
    assert "preference data (ranking: true)" in refused(folder, dataset="ranked")


def test_a_folder_that_holds_no_dataset_says_what_would(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    assert refused(tmp_path / "empty").startswith("the folder holds no dataset: expected a LLaMA-Factory data folder")


# ------------------------------------------------------------------------------ through the trainer


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tests.trainer.test_service import Stack

    s = Stack(tmp_path_factory.mktemp("trainer"))
    yield s
    s.stop()


def stored_examples(stack, dataset: pb.Dataset):
    """What the worker will read: the stored bytes, parsed as the worker parses them."""
    row = stack.core.store.get_dataset(dataset.id)
    return parse_dataset(b"".join(stack.core.datasets.read(row.sha256, 0, 1 << 20))).examples


def test_a_folder_uploads_through_the_sdk_as_one_dataset_with_progress(stack, tmp_path):
    folder = llama_factory_folder(tmp_path / "lf")
    seen: list[tuple[int, int]] = []
    chats = stack.client.upload_dataset(
        folder, dataset="chats", progress=lambda sent, total: seen.append((sent, total))
    )
    assert chats.num_records == len(CHATS) and chats.format == pb.DATASET_FORMAT_CHAT and chats.name == "lf"
    assert seen and seen[-1][0] == seen[-1][1] > 0
    examples = stored_examples(stack, chats)
    assert [m.content for m in examples[2].messages] == ["Answer briefly.", "What is 2 plus 2?", "4"]
    stats = stack.client.get_dataset(chats.id).stats
    assert (stats.source, stats.records_with_system, stats.records_with_tools) == ("llama-factory", 6, 0)
    assert stats.mean_messages == 3.0
    texts = sorted(sum(len(m["content"]) for m in c["messages"]) for c in CHATS)
    assert (stats.chars_p50, stats.chars_max) == (texts[3], texts[-1])
    with pytest.raises(grpc.RpcError) as info:
        stack.client.upload_dataset(folder)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--dataset NAME" in info.value.details()
    # The refused upload left nothing behind: no dataset, no staging files.
    staging = stack.data_dir / "trainer" / "staging"
    assert sorted(p.name for p in staging.iterdir()) == []


def test_a_job_trains_on_a_parquet_dataset(stack, tmp_path, tiny_model_dir):
    from tests.trainer.test_service import METHODS, _spec

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA), path)
    dataset = stack.client.upload_dataset(path)
    assert dataset.num_records == len(ALPACA) and dataset.format == pb.DATASET_FORMAT_ALPACA
    assert dataset.stats.source == "parquet" and dataset.stats.chars_max >= dataset.stats.chars_p50 > 0
    assert [e.messages[-1].content for e in stored_examples(stack, dataset)] == [r["output"] for r in ALPACA]
    job = stack.client.submit(_spec(tiny_model_dir, dataset.id, "from-parquet", METHODS["lora"], max_steps=4))
    done = stack.client.wait(job.id, timeout=300)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.output_ref == "from-parquet:1"
    logs = lambda job_id: [e.log.message for e in stack.client.watch(job_id) if e.HasField("log")]  # noqa: E731
    assert not any("tokens from the cache" in line for line in logs(job.id))
    # The same data, base and settings again: the second job reads the first one's tokens.
    again = stack.client.submit(_spec(tiny_model_dir, dataset.id, "from-parquet", METHODS["lora"], max_steps=4))
    assert stack.client.wait(again.id, timeout=300).state == pb.JOB_STATE_SUCCEEDED
    assert any("tokens from the cache" in line for line in logs(again.id))


def test_an_archive_that_reaches_outside_its_folder_is_refused(tmp_path):
    """A folder upload is unpacked with tarfile's data filter: a member outside the folder, or a link
    out of it, is refused and nothing is written outside."""
    import io
    import tarfile

    from services.trainer.data.sources import unpack

    def archive_of(member: str) -> Path:
        archive = tmp_path / "evil.tar"
        with tarfile.open(archive, "w") as tar:
            data = b'{"text": "x"}\n'
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return archive

    with pytest.raises(InvalidArgument, match="cannot be unpacked"):
        unpack(archive_of("../escaped.jsonl"), tmp_path / "into")
    assert not (tmp_path / "escaped.jsonl").exists()
    # An absolute member is kept inside: the filter strips the leading "/".
    inside = unpack(archive_of("/abs/escaped.jsonl"), tmp_path / "into-abs")
    assert (inside / "escaped.jsonl").is_file() and inside.is_relative_to(tmp_path / "into-abs")
    linked = tmp_path / "link.tar"
    with tarfile.open(linked, "w") as tar:
        info = tarfile.TarInfo("data.jsonl")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(InvalidArgument, match="cannot be unpacked"):
        unpack(linked, tmp_path / "into2")
