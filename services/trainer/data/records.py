"""Parse and validate dataset files: JSONL or a JSON array of alpaca, chat (openai/sharegpt) or text records.

Every record is normalised to a list of chat messages (`{"role", "content"}`) or to plain
text, so the trainer has two shapes to handle, not five. A malformed record is refused
with its line number (JSONL) or index (JSON array) and what is wrong. No torch here: the
trainer service validates uploads with this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from services.common.errors import InvalidArgument

FORMATS = ("alpaca", "chat", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class Example:
    """One training example: chat messages, or plain text (loss on every token)."""

    messages: tuple[tuple[str, str], ...] = ()
    text: str | None = None


@dataclass(frozen=True)
class ParsedDataset:
    format: str
    examples: list[Example]


def _where(index: int, jsonl: bool) -> str:
    return f"line {index}" if jsonl else f"record {index}"


def _records(data: bytes) -> Iterator[tuple[int, object, bool]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the file is not UTF-8 text (byte {exc.start})") from None
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


def to_example(record: object, fmt: str, where: str) -> Example:
    if not isinstance(record, dict):
        raise InvalidArgument(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        return Example(text=_string(record, "text", where))
    if fmt == "alpaca":
        instruction = _string(record, "instruction", where)
        extra = _string(record, "input", where, required=False)
        output = _string(record, "output", where)
        system = _string(record, "system", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = ((("system", system),) if system else ()) + (("user", user), ("assistant", output))
        return Example(messages=messages)
    if "messages" in record:
        raw, role_key, content_key, roles = record["messages"], "role", "content", {r: r for r in ROLES}
    else:
        raw, role_key, content_key, roles = record.get("conversations"), "from", "value", SHAREGPT_ROLES
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument(f"{where}: 'messages'/'conversations' must be a non-empty list")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise InvalidArgument(f"{where}: message {i} must be an object with {role_key!r} and {content_key!r}")
        role = roles.get(message.get(role_key))
        if role is None:
            raise InvalidArgument(
                f"{where}: message {i} has {role_key} {message.get(role_key)!r}; expected one of {sorted(roles)}"
            )
        content = message.get(content_key)
        if not isinstance(content, str):
            raise InvalidArgument(f"{where}: message {i} needs a string {content_key!r}")
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise InvalidArgument(f"{where}: the conversation has no assistant message to learn from")
    return Example(messages=tuple(messages))


def parse_dataset(data: bytes, fmt: str = "") -> ParsedDataset:
    """Parse and validate a whole file. `fmt` empty means detect from the first record."""
    if fmt and fmt not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}")
    examples: list[Example] = []
    for index, record, jsonl in _records(data):
        where = _where(index, jsonl)
        if not fmt:
            fmt = detect_format(record) if isinstance(record, dict) else ""
            if not fmt:
                raise InvalidArgument(
                    f"{where}: cannot tell the format; use alpaca (instruction/input/output), chat (messages or "
                    "conversations) or text (text) fields"
                )
        examples.append(to_example(record, fmt, where))
    if not examples:
        raise InvalidArgument("the dataset holds no records")
    return ParsedDataset(fmt, examples)
