"""Dataset parsing and validation (no torch)."""

from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgument
from services.trainer.data.records import parse_dataset


def test_formats_normalise_to_messages_or_text():
    alpaca = parse_dataset(b'{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief"}\n')
    assert alpaca.format == "alpaca"
    assert alpaca.examples[0].messages == (("system", "Be brief"), ("user", "Add\n\n2 and 3"), ("assistant", "5"))
    openai = parse_dataset(
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        ).encode()
    )
    sharegpt = parse_dataset(
        json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]).encode()
    )
    assert openai.format == sharegpt.format == "chat"
    assert openai.examples[0].messages == sharegpt.examples[0].messages == (("user", "hi"), ("assistant", "hello"))
    text = parse_dataset(b'{"text": "once upon a time"}\n\n{"text": "the end"}\n')
    assert [e.text for e in text.examples] == ["once upon a time", "the end"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', "line 2: not valid JSON"),
        (b'{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', "line 3: field 'output' must be"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "line 1: the conversation has no assistant message"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "line 1: message 0 has role 'robot'"),
        (b'[{"text": "a"}, 5]', "record 1: expected a JSON object"),
        (b'{"foo": 1}', "line 1: cannot tell the format"),
        (b"", "holds no records"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_records_are_refused_with_their_position(data, message):
    with pytest.raises(InvalidArgument) as info:
        parse_dataset(data)
    assert message in info.value.message
