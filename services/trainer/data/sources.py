"""Read the files people keep datasets in, one record at a time: JSONL, JSON arrays, Parquet, CSV,
Arrow, `datasets` directories, folders of shards and LLaMA-Factory data folders.

Every reader streams (a line, a record batch, a JSON value at a time), so validating an upload
holds one batch in memory whatever the file's size. Each record comes with where it was found
("line 3", "row group 0, row 17", "shard train-00001.parquet: row 4") for error messages.
Columnar files are read with pyarrow (what `datasets` itself stores and reads); a directory
arrives as a tar archive (the SDK and CLI pack it) and is unpacked with tarfile's `data` filter,
which refuses links, devices and paths outside the folder.

Records come out in TuneDock's canonical shapes (records.py): columnar rows lose the nulls their
schema fills in for absent fields, and a LLaMA-Factory dataset's `columns`/`tags` are mapped onto
the alpaca and ShareGPT field names, so one validator checks every source alike.
"""

from __future__ import annotations

import csv
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tunedock.errors import InvalidArgument

BATCH_ROWS = 1024
TEXT_EXTENSIONS = (".jsonl", ".json", ".ndjson")
COLUMNAR_EXTENSIONS = (".parquet", ".arrow", ".csv", ".tsv")
LLAMA_FACTORY_INFO = "dataset_info.json"
Record = tuple[str, object]  # (where, record)


@dataclass(frozen=True)
class SourceOptions:
    dataset: str = ""
    """A LLaMA-Factory folder: which of dataset_info.json's datasets (its key); empty: the only one."""
    split: str = ""
    """A `datasets` DatasetDict directory: which split; empty: train."""


@dataclass(frozen=True)
class Source:
    """What was uploaded, and how its records are read."""

    kind: str
    """jsonl, json, parquet, csv, arrow, datasets (save_to_disk), shards or llama-factory."""
    path: Path
    options: SourceOptions = field(default_factory=SourceOptions)

    @property
    def is_json_text(self) -> bool:
        """JSONL or a JSON array: the worker reads the upload's own bytes; other kinds are stored as JSONL."""
        return self.kind in ("jsonl", "json")

    def records(self) -> Iterator[Record]:
        return _READERS[self.kind](self.path, self.options)


# ------------------------------------------------------------------------------ detection


def is_tar(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(257)
        return fh.read(5) == b"ustar"


def unpack(archive: Path, into: Path) -> Path:
    """A directory upload (a tar archive) unpacked into `into`; the folder the archive holds, if only one."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidArgument(f"the uploaded folder (a tar archive) cannot be unpacked: {exc}") from None
    entries = [p for p in into.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def detect(path: Path, name: str = "", options: SourceOptions | None = None) -> Source:
    """The kind of a file or directory, from its magic bytes, its layout and (for CSV) its name."""
    options = options or SourceOptions()
    if path.is_dir():
        return Source(_directory_kind(path, options), path, options)
    with path.open("rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"PAR1"):
        return Source("parquet", path, options)
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return Source("arrow", path, options)
    suffix = Path(name or path.name).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return Source("csv", path, options)
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if text.startswith("["):
        return Source("json", path, options)
    first = text.splitlines()[0] if text else ""
    if first and not first.startswith(("{", "[")) and "," in first:
        return Source("csv", path, options)  # a CSV file without its extension: the header line says so
    return Source("jsonl", path, options)


def _directory_kind(path: Path, options: SourceOptions) -> str:
    if (path / LLAMA_FACTORY_INFO).is_file() and not (path / "state.json").is_file():
        return "llama-factory"
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return "datasets"
    if _shards(path):
        return "shards"
    raise InvalidArgument(
        "the folder holds no dataset: expected a LLaMA-Factory data folder (dataset_info.json), a `datasets` "
        "save_to_disk directory (state.json or dataset_dict.json), or data files (.jsonl, .json, .parquet, "
        ".arrow, .csv)"
    )


def _shards(path: Path) -> list[Path]:
    """The data files of a folder of shards, in name order, all of one kind."""
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS + COLUMNAR_EXTENSIONS
    )
    kinds = {p.suffix.lower() for p in files}
    if len(kinds) > 1:
        raise InvalidArgument(
            f"the folder mixes data files of several kinds ({', '.join(sorted(kinds))}); upload one kind per dataset"
        )
    return files


# ------------------------------------------------------------------------------ text


def _jsonl(path: Path, _: SourceOptions) -> Iterator[Record]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            line = _utf8(raw, f"line {number}")
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{where}: not UTF-8 text (byte {exc.start} of the line)") from None


MAX_RECORD_CHARS = 64 << 20  # one JSON record larger than this is refused rather than buffered


class _Window:
    """A sliding window over a text file: what JSON decoding needs of it, a chunk at a time."""

    def __init__(self, fh) -> None:
        self.fh, self.text, self.pos, self.eof = fh, "", 0, False

    def more(self) -> bool:
        chunk = self.fh.read(1 << 20)
        self.text, self.pos, self.eof = self.text[self.pos :] + chunk, 0, not chunk
        return bool(chunk)

    def peek(self) -> str:
        """The next non-blank character ("" at the end of the file), skipping blanks."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos : self.pos + 1]


def _json_array(path: Path, _: SourceOptions) -> Iterator[Record]:
    """The elements of a JSON array, decoded one at a time: memory holds one record, not the file."""
    with path.open("r", encoding="utf-8-sig") as fh:
        yield from json_array_records(fh)


def json_array_records(fh) -> Iterator[Record]:
    """The elements of the JSON array an open text file holds, read a chunk at a time."""
    decoder = json.JSONDecoder()
    window = _Window(fh)
    try:
        if window.peek() != "[":
            raise InvalidArgument("the JSON array does not start with '['")
        window.pos += 1
        index = 0
        while window.peek() != "]":
            if not window.peek():
                raise InvalidArgument(f"the JSON array is not closed with ']' (after record {index - 1})")
            if index:
                if window.peek() != ",":
                    raise InvalidArgument(f"the JSON array does not parse after record {index - 1}: expected ','")
                window.pos += 1
                if not window.peek():
                    raise InvalidArgument(f"the JSON array is not closed with ']' (after record {index - 1})")
            while True:
                try:
                    value, end = decoder.raw_decode(window.text, window.pos)
                    if end < len(window.text) or window.eof or not window.more():
                        break  # a number at the end of the window may go on in the next chunk
                except json.JSONDecodeError as exc:
                    if window.eof or len(window.text) - window.pos > MAX_RECORD_CHARS or not window.more():
                        raise InvalidArgument(f"record {index}: not valid JSON ({exc.msg})") from None
            yield f"record {index}", value
            window.pos, index = end, index + 1
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the file is not UTF-8 text ({exc.reason})") from None


# ------------------------------------------------------------------------------ columnar


def without_nulls(value: object) -> object:
    """A columnar row as its JSON record: the nulls a schema fills in for absent struct fields dropped."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def _parquet(path: Path, _: SourceOptions) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with the reason
        raise InvalidArgument(f"the Parquet file cannot be read: {exc}") from None
    for group in range(parquet.num_row_groups):
        row = 0
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
            for record in batch.to_pylist():
                yield f"row group {group}, row {row}", without_nulls(record)
                row += 1


def _arrow(path: Path, _: SourceOptions) -> Iterator[Record]:
    """An Arrow IPC file or stream (`datasets` writes streams: data-00000-of-00001.arrow), memory-mapped."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        reader = (
            pa.ipc.open_file(source) if source.read(6) == b"ARROW1" else None
        )  # file format: random access by batch
        if reader is None:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
        else:
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield f"row {row}", without_nulls(record)
                row += 1
    except pa.ArrowInvalid as exc:
        raise InvalidArgument(f"the Arrow file cannot be read: {exc}") from None


def _csv(path: Path, _: SourceOptions) -> Iterator[Record]:
    """CSV (TSV by its extension) as strings, as `datasets` and pandas give them; JSON-valued cells
    (history, messages, tools) are parsed by the validator like LLaMA-Factory's JSON strings."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header:
                raise InvalidArgument("the CSV file is empty: expected a header line naming the columns")
            number, line = 0, reader.line_num + 1  # the line a row starts on (a quoted cell may span lines)
            for row in reader:
                where, line = f"row {number + 1} (line {line})", reader.line_num + 1
                if not row:
                    continue
                number += 1
                if len(row) != len(header):
                    raise InvalidArgument(f"{where}: {len(row)} cells for {len(header)} columns ({', '.join(header)})")
                yield where, {k: _cell(v) for k, v in zip(header, row, strict=True) if v != ""}
        except csv.Error as exc:
            raise InvalidArgument(f"line {reader.line_num}: the CSV does not parse ({exc})") from None
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"the CSV file is not UTF-8 text ({exc.reason})") from None


def _cell(value: str) -> object:
    """A cell that holds a JSON list or object (messages, conversations, history) as that value."""
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# ------------------------------------------------------------------------------ directories


def _datasets_dir(path: Path, options: SourceOptions) -> Iterator[Record]:
    """A `datasets` save_to_disk directory: a Dataset (state.json lists its Arrow shards) or a
    DatasetDict (dataset_dict.json lists its splits, one Dataset directory each)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        split = options.split or "train"
        if split not in splits:
            raise InvalidArgument(f"the DatasetDict has no split {split!r}; its splits: {', '.join(splits)} (--split)")
        path = path / split
    elif options.split and options.split != "train":
        raise InvalidArgument(f"split {options.split!r} asked, but the folder is one Dataset, not a DatasetDict")
    try:
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{path.name}/state.json does not list the dataset's Arrow files ({exc})") from None
    yield from _each_shard(files, path)


def _shards_dir(path: Path, options: SourceOptions) -> Iterator[Record]:
    yield from _each_shard(_shards(path), path)


def _each_shard(files: list[Path], root: Path) -> Iterator[Record]:
    for file in files:
        if not file.is_file():
            raise InvalidArgument(f"shard {file.relative_to(root)} is missing")
        for where, record in detect(file).records():
            yield f"shard {file.relative_to(root)}: {where}", record


# ------------------------------------------------------------------------------ LLaMA-Factory

LF_ALPACA = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}
LF_SHAREGPT = {"messages": "conversations", "system": None, "tools": None}
LF_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# Column keys LLaMA-Factory maps that TuneDock does not train on (supervised text only).
LF_UNSUPPORTED = {
    "images": "images",
    "videos": "videos",
    "audios": "audios",
    "chosen": "preference data",
    "rejected": "preference data",
    "kto_tag": "preference data",
}
LF_KEYS = {"file_name", "formatting", "columns", "tags", "split", "num_samples", "ranking", "subset", "folder"}
LF_HUB = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass(frozen=True)
class LlamaFactoryEntry:
    name: str
    file: Path
    formatting: str
    columns: dict[str, str]
    tags: dict[str, str]
    split: str
    num_samples: int


def llama_factory_entry(folder: Path, wanted: str) -> LlamaFactoryEntry:
    """One dataset of a LLaMA-Factory folder's dataset_info.json, checked."""
    try:
        info = json.loads((folder / LLAMA_FACTORY_INFO).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{LLAMA_FACTORY_INFO} does not parse: {exc}") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise InvalidArgument(f"{LLAMA_FACTORY_INFO} must map dataset names to their descriptions")
    local = sorted(name for name, entry in info.items() if "file_name" in entry)
    if not wanted:
        if len(local) != 1:
            raise InvalidArgument(
                f"the folder describes {len(local)} local datasets ({', '.join(local) or 'none'}); name one "
                "(tunedock data upload FOLDER --dataset NAME)"
            )
        wanted = local[0]
    entry = info.get(wanted)
    if entry is None:
        raise InvalidArgument(f"{LLAMA_FACTORY_INFO} has no dataset {wanted!r}; it has {', '.join(sorted(info))}")
    where = f"{LLAMA_FACTORY_INFO}[{wanted!r}]"
    if "file_name" not in entry:
        hub = next((k for k in LF_HUB if k in entry), "no file_name")
        raise InvalidArgument(
            f"{where} is read from elsewhere ({hub}); TuneDock reads the folder's own files: download the data "
            "into the folder and give the entry a file_name"
        )
    unknown = set(entry) - LF_KEYS - set(LF_HUB)
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(LF_KEYS))})"
        )
    if entry.get("ranking"):
        raise InvalidArgument(f"{where} is preference data (ranking: true), which TuneDock does not train")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise InvalidArgument(f"{where}: formatting must be alpaca or sharegpt, got {formatting!r}")
    columns = entry.get("columns") or {}
    known = LF_ALPACA if formatting == "alpaca" else LF_SHAREGPT
    for key in columns:
        if key in LF_UNSUPPORTED:
            raise InvalidArgument(f"{where}: column {key!r} holds {LF_UNSUPPORTED[key]}, which TuneDock does not train")
        if key not in known:
            raise InvalidArgument(f"{where}: {formatting} columns are {', '.join(known)}; {key!r} is not one of them")
    tags = entry.get("tags") or {}
    if formatting == "alpaca" and tags:
        raise InvalidArgument(f"{where}: tags apply to sharegpt formatting only")
    if set(tags) - set(LF_TAGS):
        raise InvalidArgument(f"{where}: unknown tags {', '.join(sorted(set(tags) - set(LF_TAGS)))}")
    file = (folder / entry["file_name"]).resolve()
    if not file.is_relative_to(folder.resolve()) or not file.exists():
        raise InvalidArgument(f"{where}: file_name {entry['file_name']!r} is not in the folder")
    num_samples = entry.get("num_samples", 0) or 0
    if not isinstance(num_samples, int) or num_samples < 0:
        raise InvalidArgument(f"{where}: num_samples must be a positive integer")
    split = entry.get("split", "train")
    return LlamaFactoryEntry(
        wanted,
        file,
        formatting,
        {k: v for k, v in (known | columns).items() if v},
        LF_TAGS | tags,
        split,
        num_samples,
    )


def _llama_factory(path: Path, options: SourceOptions) -> Iterator[Record]:
    entry = llama_factory_entry(path, options.dataset)
    source = detect(entry.file, entry.file.name, SourceOptions(split=entry.split if entry.split != "train" else ""))
    if source.kind not in ("datasets",) and entry.split != "train":
        raise InvalidArgument(f"{entry.name}: split {entry.split!r} asked, but {entry.file.name} has only train")
    if entry.num_samples:
        yield from _sampled(entry, source)
        return
    for where, record in source.records():
        yield where, _mapped(entry, record, where)


def _sampled(entry: LlamaFactoryEntry, source: Source) -> Iterator[Record]:
    """num_samples records, as LLaMA-Factory picks them: a seeded sample without replacement, and
    when more are asked than there are, all of them plus a seeded draw with replacement."""
    total = sum(1 for _ in source.records())
    rng = random.Random(42)  # LLaMA-Factory's default seed
    if entry.num_samples <= total:
        chosen = {i: 1 for i in rng.sample(range(total), entry.num_samples)}
    else:
        chosen = {i: 1 for i in range(total)}
        for i in rng.choices(range(total), k=entry.num_samples - total):
            chosen[i] += 1
    for index, (where, record) in enumerate(source.records()):
        for _ in range(chosen.get(index, 0)):
            yield where, _mapped(entry, record, where)


def _mapped(entry: LlamaFactoryEntry, record: object, where: str) -> object:
    """A record of the entry's columns and tags, in TuneDock's alpaca or ShareGPT field names."""
    if not isinstance(record, dict):
        return record  # the validator says what it expected
    mapped_from = set(entry.columns.values())
    extra = {k: v for k, v in record.items() if k not in mapped_from}
    if entry.formatting == "alpaca":
        out = {LF_ALPACA[key] or key: record[column] for key, column in entry.columns.items() if column in record}
        return out | extra
    tags = entry.tags
    chat: dict = {}
    if entry.columns.get("system") in record:
        chat["system"] = record[entry.columns["system"]]
    if entry.columns.get("tools") in record:
        chat["tools"] = record[entry.columns["tools"]]
    messages = record.get(entry.columns["messages"])
    if not isinstance(messages, list):
        raise InvalidArgument(f"{where}: column {entry.columns['messages']!r} must be a list of messages")
    roles = {
        tags["user_tag"]: "human",
        tags["assistant_tag"]: "gpt",
        tags["observation_tag"]: "observation",
        tags["function_tag"]: "function_call",
        tags["system_tag"]: "system",
    }
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get(tags["role_tag"]) not in roles:
            got = message.get(tags["role_tag"]) if isinstance(message, dict) else message
            raise InvalidArgument(
                f"{where}: message {i} has {tags['role_tag']} {got!r}; the entry's tags allow {', '.join(roles)}"
            )
        conversation.append({"from": roles[message[tags["role_tag"]]], "value": message.get(tags["content_tag"])})
    return chat | extra | {"conversations": conversation}


_READERS = {
    "jsonl": _jsonl,
    "json": _json_array,
    "parquet": _parquet,
    "arrow": _arrow,
    "csv": _csv,
    "datasets": _datasets_dir,
    "shards": _shards_dir,
    "llama-factory": _llama_factory,
}
