"""Tool calls out of completions: vLLM's per-family tool-call parsers, chosen by the served base.

A model writes a tool call in its family's own syntax (Qwen2.5/Hermes `<tool_call>{...}</tool_call>`,
Llama-3.1 a JSON object, Mistral `[TOOL_CALLS][...]`, Phi-4-mini `functools[...]`); vLLM ships a
parser for each, and TuneDock uses them as they are. Which one fits is decided once per engine:
the `tool_parser` setting, or on "auto" the marker the base's chat template writes, else the
architecture's family. `tool_choice`:
- "auto": the model decides; the family parser finds calls in the text (also while streaming);
- "none": the tools are rendered but nothing is parsed;
- "required" or a named function: decoding is constrained to the JSON of a call (vLLM's
  structured outputs, as vLLM's own server does), so every family gives a parseable call.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from tunedock.errors import InvalidArgument

log = logging.getLogger(__name__)

# What a chat template writes around a tool call -> the vLLM parser that reads it back.
TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
    ("functools[", "phi4_mini_json"),
)
# config.json's model_type -> parser, for templates without a recognised marker.
FAMILY_PARSERS = {
    "qwen2": "hermes",
    "qwen3": "hermes",
    "llama": "llama3_json",
    "mistral": "mistral",
    "phi3": "phi4_mini_json",
    "gemma3": "pythonic",
    "gemma3_text": "pythonic",
}


def choose_parser(setting: str, template: str, model_type: str, tokenizer) -> str:
    """The parser's name ("" for none): the setting, or on "auto" the template's marker, else the family's.

    A parser is only chosen if it can work with this tokenizer (some look up their marker tokens at
    start-up): a named one that cannot is refused, an automatic pick that cannot is dropped (logged)."""
    from vllm.tool_parsers import ToolParserManager

    if setting == "none":
        return ""
    if setting != "auto":
        try:
            parser = ToolParserManager.get_tool_parser(setting)
        except KeyError:
            raise InvalidArgument(f"tool_parser {setting!r} is not one of vLLM's tool-call parsers") from None
        try:
            parser(tokenizer, [])
        except Exception as exc:  # the parser's own check of the tokenizer (RuntimeError, ValueError...)
            raise InvalidArgument(f"tool_parser {setting!r} does not work with this base's tokenizer: {exc}") from None
        return setting
    name = next((p for marker, p in TEMPLATE_MARKERS if marker in template), FAMILY_PARSERS.get(model_type, ""))
    if not name:
        return ""
    try:
        ToolParserManager.get_tool_parser(name)(tokenizer, [])
    except Exception as exc:
        log.info("no tool-call parser: %s (picked for this base) does not fit its tokenizer: %s", name, exc)
        return ""
    return name


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


@dataclass
class ToolCallDelta:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class ToolCalls:
    """One request's tool handling: the constraint it decodes under and the parser of its output."""

    tools: list[dict]
    choice: str | dict
    parser_name: str
    tokenizer: Any
    request: Any = None
    """vLLM's ChatCompletionRequest of the tools (what its parsers read)."""
    parser: Any = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    streamed_calls: int = 0

    @classmethod
    def build(cls, tools: list[dict], choice: str | dict, parser_name: str, tokenizer) -> ToolCalls:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMValidationError

        try:
            request = ChatCompletionRequest.model_validate(
                {"messages": [{"role": "user", "content": ""}], "model": "", "tools": tools, "tool_choice": choice}
            )
        except VLLMValidationError as exc:  # vLLM's own checks (e.g. a tool_choice naming no given tool)
            raise InvalidArgument(f"tools/tool_choice: {exc.args[0] if exc.args else exc}") from None
        except ValueError as exc:  # pydantic's ValidationError: a tool spec or tool_choice vLLM cannot read
            raise InvalidArgument(f"tools/tool_choice: {_first_error(exc)}") from None
        handler = cls(tools, choice, parser_name, tokenizer, request)
        if handler.parses_free_text:
            if not parser_name:
                raise InvalidArgument(
                    "this replica has no tool-call parser for its base model (set --tool-parser to one of vLLM's "
                    "parsers), so tool_choice 'auto' cannot return tool calls; use tool_choice 'required' or name "
                    "a function"
                )
            from vllm.tool_parsers import ToolParserManager

            handler.parser = ToolParserManager.get_tool_parser(parser_name)(tokenizer, request.tools)  # type: ignore[arg-type]
            handler.request = handler.parser.adjust_request(request)
        return handler

    def fresh(self) -> ToolCalls:
        """A handler with its own parser state, for one choice of a request (parsers keep streaming state)."""
        parser = type(self.parser)(self.tokenizer, self.request.tools) if self.parser is not None else None
        return ToolCalls(self.tools, self.choice, self.parser_name, self.tokenizer, self.request, parser)

    @property
    def parses_free_text(self) -> bool:
        return self.choice == "auto"

    @property
    def constrained(self) -> bool:
        return self.choice not in ("auto", "none")

    def json_schema(self) -> dict | None:
        """The schema decoding is constrained to for "required" and named tool choices."""
        if not self.constrained:
            return None
        from vllm.tool_parsers.utils import get_json_schema_from_tools

        request = self.request
        schema = get_json_schema_from_tools(request.tool_choice, request.tools, request.parallel_tool_calls)
        return json.loads(schema) if isinstance(schema, str) else schema

    @property
    def skip_special_tokens(self) -> bool:
        return bool(getattr(self.request, "skip_special_tokens", True))

    def final(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole completion."""
        if self.choice == "none":
            return text, []
        if self.constrained:
            return "", self._constrained_calls(text)
        info = self.parser.extract_tool_calls(text, self.request)
        if not info.tools_called:
            return text, []
        calls = [ToolCall(c.id or _call_id(), c.function.name, c.function.arguments) for c in info.tool_calls]
        return info.content or "", calls

    def _constrained_calls(self, text: str) -> list[ToolCall]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return []  # cut off by max_tokens: the finish reason says "length"
        if isinstance(self.choice, dict):
            return [ToolCall(_call_id(), self.choice["function"]["name"], json.dumps(value, ensure_ascii=False))]
        return [
            ToolCall(_call_id(), call["name"], json.dumps(call.get("parameters", {}), ensure_ascii=False))
            for call in value
            if isinstance(call, dict) and "name" in call
        ]

    def stream(self, delta_text: str, delta_ids: list[int], last: bool) -> tuple[str, list[ToolCallDelta]]:
        """(content delta, tool call deltas) for one engine delta of a streamed completion."""
        if self.choice == "none":
            return delta_text, []
        previous_text, previous_ids = self.text, self.token_ids
        self.text = previous_text + delta_text
        self.token_ids = previous_ids + list(delta_ids)
        if self.constrained:  # the JSON is only a call once whole: sent with the last delta
            if not last:
                return "", []
            whole = self._constrained_calls(self.text)
            return "", [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(whole)]
        delta = self.parser.extract_tool_calls_streaming(
            previous_text, self.text, delta_text, previous_ids, self.token_ids, list(delta_ids), self.request
        )
        deltas: list[ToolCallDelta] = []
        for call in (delta.tool_calls or []) if delta is not None else []:
            function = call.function
            name = (function.name or "") if function else ""
            arguments = (function.arguments or "") if function else ""
            deltas.append(ToolCallDelta(call.index, call.id or "", name, arguments))
        if last and self.parser.prev_tool_call_arr:  # what the parser held back waiting for more text
            remaining = self.parser.get_remaining_unstreamed_args()
            if remaining:
                deltas.append(ToolCallDelta(len(self.parser.prev_tool_call_arr) - 1, arguments=remaining))
        return (delta.content or "") if delta is not None else "", deltas


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        found = errors()
        if found:
            where = ".".join(str(p) for p in found[0].get("loc", ()))
            return f"{where}: {found[0].get('msg', '')}" if where else str(found[0].get("msg", ""))
    return str(exc)
