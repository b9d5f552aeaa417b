"""Chat conversations as a base model's chat template sees them: one renderer for training and serving.

An adapter answers well only if it is served the prompt it was trained on, token for token. So the
trainer (loss masks) and the inference core (prompts) both go through this module: the same
message normalisation (OpenAI's and LLaMA-Factory's shapes to the transformers template convention),
the same handling of templates without a system role, the same tool rendering, the same
tokenization (the rendered text, no special tokens added: the template writes its own BOS).

Template convention (what `apply_chat_template` reads): `{"role", "content"}`, assistant turns may
carry `tool_calls: [{"type": "function", "id"?, "function": {"name", "arguments": {...}}}]` with
arguments as an object (templates `tojson` them), tool turns may carry `tool_call_id`. Tools are
`[{"type": "function", "function": {"name", "description"?, "parameters"?}}]`.

No torch here: the trainer service validates uploads and the inference front renders prompts with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
"""OpenAI's roles -> the template's (a `developer` message is a system prompt to every open template)."""


class ConversationError(ValueError):
    """A conversation that is malformed, or that the base model's chat template refuses (says which and why)."""


def json_value(value: object, what: str) -> object:
    """A JSON-encoded string (OpenAI's tool arguments, LLaMA-Factory's columns) or the value itself."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ConversationError(f"{what} is a string that is not valid JSON") from None
    return value


def normalize_tools(value: object) -> list[dict]:
    """Tool specs, normalised to `[{"type": "function", "function": {...}}]` (a bare function spec is accepted).

    Templates write tools with `tojson`, keys in order, so the order is fixed here: type, then the
    function's name, description, parameters, then anything else as given. A dataset's tools and a
    client's tools then render to the same tokens whatever order each was written in."""
    tools = json_value(value, "'tools'")
    if tools in (None, "", []):
        return []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConversationError("'tools' must be a list of tool specs (objects)")
    normalised = []
    for tool in tools:
        spec = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ConversationError(f"every tool needs a function with a 'name' (got {json.dumps(tool)[:80]})")
        ordered = {k: spec[k] for k in ("name", "description", "parameters") if k in spec}
        ordered.update((k, v) for k, v in spec.items() if k not in ordered)
        normalised.append({"type": "function", "function": ordered})
    return normalised


def normalize_tool_calls(calls: object, i: int) -> list[dict]:
    """An assistant turn's tool calls in the template convention (arguments as an object, ids kept)."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise ConversationError(f"message {i}: tool calls must be an object or a non-empty list")
    normalised = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str) or not name:
            raise ConversationError(f"message {i}: a tool call needs a function 'name'")
        arguments = json_value(function.get("arguments", {}), f"message {i}'s tool call arguments")
        if not isinstance(arguments, dict):
            raise ConversationError(f"message {i}: tool call arguments must be a JSON object")
        normalised_call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"]:
            normalised_call["id"] = call["id"]
        normalised.append(normalised_call)
    return normalised


def text_content(content: object, i: int) -> str:
    """A message's text: a string, or OpenAI's list of content parts (text parts only), or none."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ConversationError(
                    f"message {i}: content part of type {kind!r} is not served (TuneDock serves text models): "
                    "send text parts only"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ConversationError(f"message {i}: content must be a string or a list of text parts")


def openai_message(message: object, i: int) -> dict:
    """One OpenAI chat message (system/developer/user/assistant/tool) in the template convention."""
    if not isinstance(message, dict):
        raise ConversationError(f"message {i} must be an object with 'role' and 'content'")
    given = message.get("role")
    role = ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise ConversationError(f"message {i} has role {given!r}; expected one of {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": role, "content": text_content(message.get("content"), i)}
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = normalize_tool_calls(message["tool_calls"], i)
    elif role == "assistant" and message.get("function_call"):  # OpenAI's legacy single call
        out["tool_calls"] = normalize_tool_calls(message["function_call"], i)
    if role == "tool":
        if isinstance(message.get("tool_call_id"), str) and message["tool_call_id"]:
            out["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str) and message["name"]:
            out["name"] = message["name"]
    return out


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template, the same way for training and serving."""

    def __init__(self, tokenizer, notice: Callable[[str], None] = lambda message: None) -> None:
        self.tokenizer = tokenizer
        self.notice = notice
        self.template = getattr(tokenizer, "chat_template", None) or ""
        self._system_ok: bool | None = None
        self._tools_ok: bool | None = None
        self._noticed = False

    @property
    def has_template(self) -> bool:
        return bool(self.template)

    def render(self, messages: list[dict], tools: list[dict] | None = None, generation_prompt: bool = False) -> str:
        """The conversation as text; ConversationError when the template refuses it (its own message)."""
        if not self.has_template:
            raise ConversationError(
                "the base model's tokenizer has no chat template, so chat messages cannot be rendered; "
                "use a model with one (an instruct/chat checkpoint) or send a raw prompt"
            )
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
                )
            )
        except Exception as exc:  # jinja2's TemplateError and friends: the template refused the conversation
            raise ConversationError(f"the base model's chat template refused the conversation: {exc}") from None

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """What the model continues: the conversation (system prompt fitted, tools checked) + the generation prompt."""
        messages = self.fit_system(messages)
        if tools:
            self.check_tools(messages, tools)
        return self.render(messages, tools, generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text: no special tokens added (the template wrote the ones it wants)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit_system(self, messages: list[dict]) -> list[dict]:
        """A template without a system role gets the system prompt at the head of the first user turn
        (as Gemma3's own template does); other conversations are returned as they are."""
        if not messages or messages[0]["role"] != "system" or self.accepts_system():
            return messages
        system, rest = messages[0], [dict(m) for m in messages[1:]]
        if not self._noticed:
            self._noticed = True
            self.notice(
                "the chat template has no system role: system prompts are put at the head of the first user turn"
            )
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{system['content']}\n\n{m['content']}"
                break
        return rest

    def accepts_system(self) -> bool:
        if self._system_ok is None:
            chat = [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
            try:
                self.tokenizer.apply_chat_template(chat, tokenize=False)
                self._system_ok = True
            except Exception:
                self._system_ok = False
        return self._system_ok

    def renders_tools(self) -> bool:
        """Whether the template writes tool specs into the prompt at all (a probe tool's name shows up)."""
        if self._tools_ok is None:
            probe = [{"type": "function", "function": {"name": "tunedock_probe_tool", "parameters": {}}}]
            try:
                text = self.render([{"role": "user", "content": "u"}], probe, generation_prompt=True)
                self._tools_ok = "tunedock_probe_tool" in text
            except ConversationError:
                self._tools_ok = False
        return self._tools_ok

    def check_tools(self, messages: list[dict], tools: list[dict]) -> None:
        """Tool specs and tool calls must show up in the rendering, or the model would learn (or be asked
        for) calls to nothing."""
        text = self.render(messages, tools, generation_prompt=False)
        names = [t["function"]["name"] for t in tools]
        called = [c["function"]["name"] for m in messages for c in m.get("tool_calls", [])]
        missing = [n for n in dict.fromkeys(names + called) if n not in text]
        if missing:
            raise ConversationError(
                "the base model's chat template does not render tools or tool calls (missing: "
                f"{', '.join(missing)}); tools need a template with tool support (Qwen2.5, Llama-3.1, "
                "Mistral's tokenizer v3+)"
            )
