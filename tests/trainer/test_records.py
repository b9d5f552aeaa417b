"""Dataset parsing and validation (no torch): LLaMA-Factory's and OpenAI's formats, refusals by name."""

from __future__ import annotations

import json

import pytest

from services.trainer.data.records import parse_dataset
from tunedock.errors import InvalidArgument


def _pairs(example) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in example.messages]


def test_formats_normalise_to_messages_or_text():
    alpaca = parse_dataset(b'{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief"}\n')
    assert alpaca.format == "alpaca"
    assert _pairs(alpaca.examples[0]) == [("system", "Be brief"), ("user", "Add\n\n2 and 3"), ("assistant", "5")]
    openai = parse_dataset(
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        ).encode()
    )
    sharegpt = parse_dataset(
        json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]).encode()
    )
    assert openai.format == sharegpt.format == "chat"
    assert _pairs(openai.examples[0]) == _pairs(sharegpt.examples[0]) == [("user", "hi"), ("assistant", "hello")]
    text = parse_dataset(b'{"text": "once upon a time"}\n\n{"text": "the end"}\n')
    assert [e.text for e in text.examples] == ["once upon a time", "the end"]


def test_alpaca_history_becomes_earlier_turns():
    record = {"instruction": "And 3?", "output": "9", "history": [["Square 2", "4"]]}
    example = parse_dataset(json.dumps(record).encode()).examples[0]
    assert _pairs(example) == [("user", "Square 2"), ("assistant", "4"), ("user", "And 3?"), ("assistant", "9")]


def test_sharegpt_tool_calling_with_system_and_tools_columns():
    """LLaMA-Factory's glaive_toolcall demo shape: function_call/observation turns, tools as a JSON string."""
    tools = [{"name": "weather", "description": "Weather in a city", "parameters": {"type": "object"}}]
    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
            {"from": "observation", "value": '{"temp": -3}'},
            {"from": "gpt", "value": "It is -3 degrees."},
        ],
        "system": "You are a weather bot.",
        "tools": json.dumps(tools),
    }
    example = parse_dataset(json.dumps(record).encode()).examples[0]
    assert [m.role for m in example.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert example.messages[0].content == "You are a weather bot."
    call = json.loads(example.messages[2].tool_calls)
    assert call == [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    assert example.template_tools() == [{"type": "function", "function": tools[0]}]


def test_openai_tool_calls_and_weights():
    record = {
        "messages": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "Add 2 and 3"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
            {"role": "assistant", "content": "Five.", "weight": 0},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Welcome."},
        ],
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}],
    }
    example = parse_dataset(json.dumps(record).encode()).examples[0]
    assert example.messages[0].role == "system"
    assert json.loads(example.messages[2].tool_calls)[0]["function"]["arguments"] == {"a": 2}
    assert [m.learn for m in example.messages if m.role == "assistant"] == [True, False, True]


def test_metadata_columns_are_reported_as_ignored():
    parsed = parse_dataset(b'{"id": 7, "source": "web", "instruction": "a", "output": "b"}\n')
    assert parsed.ignored_columns == ("id", "source")


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
        # Preference and multimodal data: refused with the format named, never trained as if it were SFT.
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}], '
            b'"label": false}',
            "preference data (KTO",
        ),
        (b'{"instruction": "q", "chosen": "a", "rejected": "b", "output": "a"}', "preference data (DPO"),
        (
            b'{"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "a"}], '
            b'"images": ["x.png"]}',
            "multimodal data (images)",
        ),
        (b'{"instruction": "a", "output": "b", "rating": 5}', "column 'rating' is not part of any format"),
        (
            b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{\\"name\\": '
            b'\\"f\\"}"}, {"from": "gpt", "value": "ok"}]}',
            "calls tools but the record lists no 'tools'",
        ),
        # Files that are not datasets.
        (
            json.dumps(
                {"alpaca_demo": {"file_name": "alpaca_en_demo.json"}, "glaive": {"file_name": "g.json"}}, indent=2
            ).encode(),
            "dataset_info.json",
        ),
    ],
)
def test_malformed_records_are_refused_with_their_position(data, message):
    with pytest.raises(InvalidArgument) as info:
        parse_dataset(data)
    assert message in info.value.message
