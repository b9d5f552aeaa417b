"""Parse and validate dataset files: JSONL or a JSON array of alpaca, chat or text records.

Formats (LLaMA-Factory's and OpenAI's):
- alpaca: `instruction`, `input`, `output`, optional `system` and `history` ([[prompt, answer], ...]);
- chat, OpenAI style: `messages` of `{role, content}` (roles system/developer, user, assistant, tool),
  assistant `tool_calls` and `weight` (0: no loss on that turn), top-level `tools` (or `functions`);
- chat, ShareGPT style: `conversations` of `{from, value}` (human, gpt, system, function_call,
  observation), top-level `system` and `tools` (a JSON string or list);
- text: `text` (loss on every token).

Every record becomes a list of chat messages (with tool calls where there are any) or plain
text, so the trainer has two shapes to handle, not five. Every column is used or refused by
name: preference data (DPO `chosen`/`rejected`, KTO `label`/`kto_tag`) and multimodal data
(`images`, `videos`, `audios`) are refused with the format named, since TuneDock trains
supervised fine-tuning on text; a few conventional metadata columns (`id`, `source`, ...)
are accepted and reported as ignored. A malformed record is refused with where it was found
(sources.py reads each file kind and says where: line, row group and row, shard). JSON files
that are not datasets (LLaMA-Factory's `dataset_info.json` alone, one object over several lines)
are recognised and refused with what to do instead.
No torch here: the trainer service validates uploads with this module.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from services.common.chat import ROLES as OPENAI_ROLES
from services.common.chat import ConversationError, json_value, normalize_tool_calls, normalize_tools
from tunedock.errors import InvalidArgument

FORMATS = ("alpaca", "chat", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # a tool call (the value is {"name", "arguments"} as JSON)
    "observation": "tool",  # a tool's result
    "tool": "tool",
}
# Columns whose data TuneDock cannot train on, and why: refused by name.
UNSUPPORTED = {
    "chosen": "preference data (DPO: chosen/rejected)",
    "rejected": "preference data (DPO: chosen/rejected)",
    "label": "preference data (KTO: a desirable/undesirable label)",
    "kto_tag": "preference data (KTO: a desirable/undesirable tag)",
    "images": "multimodal data (images)",
    "videos": "multimodal data (videos)",
    "audios": "multimodal data (audios)",
}
# Metadata columns accepted and reported as ignored (they carry nothing to train on).
METADATA = ("id", "uuid", "source", "category", "meta", "metadata", "dataset", "lang", "language")
USED = {
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "openai": {"messages", "tools", "functions", "parallel_tool_calls"},
    "sharegpt": {"conversations", "system", "tools"},
    "text": {"text"},
}


@dataclass(frozen=True)
class Message:
    """One chat turn. `tool_calls` is a JSON list in the transformers convention (assistant turns only)."""

    role: str
    content: str
    tool_calls: str = ""
    learn: bool = True
    """Assistant turns only: whether the loss covers this turn (OpenAI's `weight`)."""
    tool_call_id: str = ""
    """Tool turns only: the call this result answers (OpenAI's `tool_call_id`; some templates render it)."""

    def to_template(self) -> dict:
        """The dict a chat template reads (services.common.chat's convention, as serving builds it)."""
        message: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = json.loads(self.tool_calls)
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass(frozen=True)
class Example:
    """One training example: chat messages (and the tools they may call), or plain text (loss on every token)."""

    messages: tuple[Message, ...] = ()
    text: str | None = None
    tools: str = ""
    """JSON list of tool specs ({"type": "function", "function": {...}}), for templates that render tools."""
    where: str = field(default="", compare=False)
    """Where the record came from ("line 3"), for error messages at training time."""

    def template_messages(self) -> list[dict]:
        return [m.to_template() for m in self.messages]

    def template_tools(self) -> list[dict] | None:
        return json.loads(self.tools) if self.tools else None


@dataclass(frozen=True)
class ParsedDataset:
    format: str
    examples: list[Example]
    ignored_columns: tuple[str, ...] = ()


def _where(index: int, jsonl: bool) -> str:
    return f"line {index}" if jsonl else f"record {index}"


def not_a_dataset(text: str) -> str | None:
    """Why a file that parses as something else is not a dataset, or None."""
    head = text.lstrip()[:2000]
    if head.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            return None
        if (
            isinstance(whole, dict)
            and whole
            and all(
                isinstance(v, dict) and {"file_name", "hf_hub_url", "ms_hub_url", "script_url"} & set(v)
                for v in whole.values()
            )
        ):
            names = sorted({v.get("file_name", "") for v in whole.values() if v.get("file_name")})[:5]
            return (
                "this is LLaMA-Factory's dataset_info.json, a list of datasets, not a dataset; upload the folder "
                "that holds it and the files it names (tunedock data upload FOLDER --dataset NAME), or one of "
                f"those files (e.g. {', '.join(names) or 'the file_name entries'})"
            )
        if isinstance(whole, dict) and "\n" in text.strip():
            return (
                "the file is one JSON object spread over several lines; put one record per line (JSONL) "
                "or wrap the records in a JSON array"
            )
        return None
    return None


def _records(data: bytes) -> Iterator[tuple[int, object, bool]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the file is not UTF-8 text (byte {exc.start})") from None
    why = not_a_dataset(text)
    if why:
        raise InvalidArgument(why)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"the JSON array does not parse: {exc.msg} at line {exc.lineno}") from None
        for i, record in enumerate(array):
            yield i, record, False
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), True
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def detect_format(record: dict) -> str:
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return ""


def _string(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidArgument(f"{where}: field {key!r} must be a non-empty string")
    return value


def _check_columns(record: dict, used: set[str], where: str, ignored: set[str]) -> None:
    for key in record:
        if key in used:
            continue
        if key in UNSUPPORTED:
            raise InvalidArgument(
                f"{where}: column {key!r} holds {UNSUPPORTED[key]}, which TuneDock does not train (it trains "
                "supervised fine-tuning on text); remove the column, or keep only the desirable answers as "
                "ordinary records"
            )
        if key in METADATA:
            ignored.add(key)
            continue
        raise InvalidArgument(
            f"{where}: column {key!r} is not part of any format TuneDock reads; remove it "
            f"(columns used here: {', '.join(sorted(used))}; metadata columns accepted and ignored: "
            f"{', '.join(METADATA)})"
        )


def _tools(value: object, where: str) -> str:
    """Tool specs, normalised to OpenAI's [{"type": "function", "function": {...}}] (as serving does)."""
    try:
        tools = normalize_tools(value)
    except ConversationError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    return json.dumps(tools) if tools else ""  # key order kept: the template writes them as serving will


def _tool_calls(calls: object, where: str, i: int) -> str:
    """Tool calls in the transformers convention: [{"type": "function", "function": {"name", "arguments": {...}}}]."""
    try:
        return json.dumps(normalize_tool_calls(calls, i))
    except ConversationError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def _alpaca(record: dict, where: str) -> Example:
    instruction = _string(record, "instruction", where)
    extra = _string(record, "input", where, required=False)
    output = _string(record, "output", where)
    system = _string(record, "system", where, required=False)
    messages = [Message("system", system)] if system else []
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
    ):
        raise InvalidArgument(f"{where}: 'history' must be a list of [prompt, answer] string pairs")
    for prompt, answer in history:
        messages += [Message("user", prompt), Message("assistant", answer)]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [Message("user", user), Message("assistant", output)]
    return Example(messages=tuple(messages), where=where)


def _chat(record: dict, where: str, openai: bool) -> Example:
    if openai:
        raw, role_key, content_key, roles = record["messages"], "role", "content", OPENAI_ROLES
        tools = _tools(record.get("tools") or record.get("functions"), where)
        system = ""
    else:
        raw, role_key, content_key, roles = record.get("conversations"), "from", "value", SHAREGPT_ROLES
        tools = _tools(record.get("tools"), where)
        system = _string(record, "system", where, required=False)
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument(f"{where}: 'messages'/'conversations' must be a non-empty list")
    messages = [Message("system", system)] if system else []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise InvalidArgument(f"{where}: message {i} must be an object with {role_key!r} and {content_key!r}")
        given = message.get(role_key)
        role = roles.get(given) if isinstance(given, str) else None
        if role is None:
            raise InvalidArgument(f"{where}: message {i} has {role_key} {given!r}; expected one of {sorted(roles)}")
        content = message.get(content_key)
        calls = ""
        if given == "function_call":
            try:
                call = json_value(content, f"message {i}")
            except ConversationError as exc:
                raise InvalidArgument(f"{where}: {exc}") from None
            calls, content = _tool_calls(call, where, i), ""
        elif openai and role == "assistant" and message.get("tool_calls"):
            calls, content = _tool_calls(message["tool_calls"], where, i), content or ""
        if not isinstance(content, str):
            raise InvalidArgument(f"{where}: message {i} needs a string {content_key!r}")
        weight = message.get("weight", 1)
        if weight not in (0, 1):
            raise InvalidArgument(f"{where}: message {i}: weight must be 0 or 1, got {weight!r}")
        call_id = message.get("tool_call_id") if openai and role == "tool" else ""
        call_id = call_id if isinstance(call_id, str) else ""
        messages.append(Message(role, content, calls, learn=bool(weight), tool_call_id=call_id))
    if not tools and any(m.tool_calls for m in messages):
        raise InvalidArgument(f"{where}: the conversation calls tools but the record lists no 'tools' to call")
    if not any(m.role == "assistant" and m.learn for m in messages):
        raise InvalidArgument(f"{where}: the conversation has no assistant message to learn from")
    return Example(messages=tuple(messages), tools=tools, where=where)


def to_example(record: object, fmt: str, where: str, ignored: set[str] | None = None) -> Example:
    if not isinstance(record, dict):
        raise InvalidArgument(f"{where}: expected a JSON object, got {type(record).__name__}")
    ignored = set() if ignored is None else ignored
    if fmt == "text":
        _check_columns(record, USED["text"], where, ignored)
        return Example(text=_string(record, "text", where), where=where)
    if fmt == "alpaca":
        _check_columns(record, USED["alpaca"], where, ignored)
        return _alpaca(record, where)
    openai = "messages" in record
    _check_columns(record, USED["openai" if openai else "sharegpt"], where, ignored)
    return _chat(record, where, openai)


@dataclass(frozen=True)
class Validated:
    """What validation found in a stream of records."""

    format: str
    num_records: int
    ignored_columns: tuple[str, ...] = ()


def validate_records(
    records: Iterable[tuple[str, object]], fmt: str = "", keep: Callable[[Example, object], object] | None = None
) -> Validated:
    """Validate (where, record) pairs one at a time (sources.py streams them from any file kind);
    `keep` sees each example and its record. `fmt` empty means detect from the first record."""
    if fmt and fmt not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}")
    ignored: set[str] = set()
    count = 0
    for where, record in records:
        if not fmt:
            fmt = detect_format(record) if isinstance(record, dict) else ""
            if not fmt:
                raise InvalidArgument(
                    f"{where}: cannot tell the format; use alpaca (instruction/input/output), chat (messages or "
                    "conversations) or text (text) fields"
                )
        example = to_example(record, fmt, where, ignored)
        if keep is not None:
            keep(example, record)
        count += 1
    if not count:
        raise InvalidArgument("the dataset holds no records")
    return Validated(fmt, count, tuple(sorted(ignored)))


def parse_dataset(data: bytes, fmt: str = "") -> ParsedDataset:
    """Parse and validate a whole JSONL / JSON-array file held in memory (the worker's stored copy)."""
    examples: list[Example] = []
    found = validate_records(
        ((_where(index, jsonl), record) for index, record, jsonl in _records(data)),
        fmt,
        lambda example, _: examples.append(example),
    )
    return ParsedDataset(found.format, examples, found.ignored_columns)


class RecordStats:
    """What validation measures of the records it sees, one at a time (4 bytes a record kept)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.chars = array("I")
        self.with_tools = self.with_system = self.messages = 0

    def add(self, example: Example) -> None:
        if example.text is not None:
            self.chars.append(min(len(example.text), 2**32 - 1))
            return
        self.chars.append(min(sum(len(m.content) + len(m.tool_calls) for m in example.messages), 2**32 - 1))
        self.with_tools += bool(example.tools)
        self.with_system += any(m.role == "system" for m in example.messages)
        self.messages += len(example.messages)

    def summary(self) -> dict:
        ordered = sorted(self.chars)
        n = len(ordered)

        def at(q: float) -> int:
            return int(ordered[min(n - 1, int(q * n))]) if n else 0

        return {
            "source": self.source,
            "chars_p50": at(0.5),
            "chars_p95": at(0.95),
            "chars_max": int(ordered[-1]) if n else 0,
            "records_with_tools": self.with_tools,
            "records_with_system": self.with_system,
            "mean_messages": self.messages / n if n else 0.0,
        }
