"""Tool-call parsing per family, without an engine: what a template writes for a call, its parser reads back.

For each family of the test matrix whose template renders tool calls, the assistant turn of a
conversation with a call is rendered by the family's own template, and the parser TuneDock picks
for that base must recover the call from exactly that text (unary and streamed token by token).
Families whose templates cannot render tools get no parser guesswork: their requests with tools
are refused (tests/inference/test_openai_api.py).
"""

from __future__ import annotations

import json

import pytest

from services.common.chat import ChatRenderer, ConversationError
from services.inference.tools import ToolCalls, choose_parser
from tests.conftest import MODEL_CACHE
from tunedock.errors import InvalidArgument
from tunedock.tiny_model import FAMILY_MATRIX, TinyModelSpec, build_tiny_model

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}


def _tokenizer(family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_model(TinyModelSpec(family=family), cache_dir=MODEL_CACHE))


def _model_type(family: str) -> str:
    path = build_tiny_model(TinyModelSpec(family=family), cache_dir=MODEL_CACHE)
    return json.loads((path / "config.json").read_text())["model_type"]


def _rendered_call(tokenizer) -> str:
    """The assistant's tool-call turn as the template writes it (what a trained model learns to say)."""
    renderer = ChatRenderer(tokenizer)
    ask = [{"role": "user", "content": "Weather in Rome?"}]
    before = renderer.render(ask, [WEATHER], generation_prompt=True)
    whole = renderer.render([*ask, {"role": "assistant", "content": "", "tool_calls": [CALL]}], [WEATHER])
    assert whole.startswith(before)
    return whole[len(before) :]


@pytest.mark.parametrize("family", ["llama", *FAMILY_MATRIX])
def test_the_parser_chosen_for_a_family_reads_the_calls_its_template_writes(family):
    tokenizer = _tokenizer(family)
    renderer = ChatRenderer(tokenizer)
    parser = choose_parser("auto", renderer.template, _model_type(family), tokenizer)
    if not renderer.renders_tools():  # the tiny template has no tool support: requests with tools are refused
        with pytest.raises(ConversationError, match="does not render tools"):
            renderer.prompt([{"role": "user", "content": "Weather in Rome?"}], [WEATHER])
        return
    assert parser, f"{family}: a template that renders tool calls needs a parser"
    text = _rendered_call(tokenizer)
    for end in (tokenizer.eos_token, "<|im_end|>"):
        text = text.split(end)[0] if end else text
    handler = ToolCalls.build([WEATHER], "auto", parser, tokenizer)
    content, calls = handler.fresh().final(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert not content.strip()
    # Streamed token by token, the deltas add up to the same call.
    streaming = handler.fresh()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    names, arguments = "", ""
    for i, token in enumerate(ids):
        piece = tokenizer.decode(ids[: i + 1])[len(tokenizer.decode(ids[:i])) :]
        _, deltas = streaming.stream(piece, [token], last=i == len(ids) - 1)
        names += "".join(d.name for d in deltas)
        arguments += "".join(d.arguments for d in deltas)
    assert names == "get_weather" and json.loads(arguments) == {"city": "Rome"}


def test_parser_settings_are_checked_against_the_tokenizer():
    tokenizer = _tokenizer("llama")
    assert choose_parser("none", "", "llama", tokenizer) == ""
    assert choose_parser("hermes", "", "llama", tokenizer) == "hermes"
    with pytest.raises(InvalidArgument, match="not one of vLLM's tool-call parsers"):
        choose_parser("no-such-parser", "", "llama", tokenizer)
    with pytest.raises(InvalidArgument, match="does not work with this base's tokenizer"):
        choose_parser("llama3_json", "", "llama", tokenizer)  # it needs <|python_tag|>, which this vocab lacks
    # "auto" on a Llama architecture without the marker: no parser rather than one that cannot work.
    assert choose_parser("auto", "{{ messages }}", "llama", tokenizer) == ""
