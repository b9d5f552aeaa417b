"""Examples to token ids with a loss mask: chat through the tokenizer's own template, text as is.

The loss covers what the model must learn to say: each assistant turn (its text and the token
that ends the turn, so the model learns to stop), nothing the user, the system or a tool said.
Finding those tokens must work for every family's template, which differ in ways that matter:

1. A template that marks assistant text with `{% generation %}` says so itself: transformers'
   `return_assistant_tokens_mask` gives the mask.
2. Otherwise the conversation up to turn i (with the generation prompt) is rendered; if it is a
   prefix of the whole rendering, the turn starts there and ends where the rendering of the
   conversation up to and including turn i stops agreeing with the whole one, token by token.
   That stops before Phi-3.5's closing EOS, which the next turn replaces with `<|user|>`.
3. Where prefixes do not render as prefixes (Mistral v0.3 puts the system prompt into the *last*
   user turn), the turn's text is found in the rendering and extended by the template's own
   end-of-turn tokens.

A template that refuses a system role (Gemma2) gets the system prompt at the head of the first
user turn, as Gemma3's template does itself; a conversation with tools goes through the template's
tool support, and one whose template cannot render tools is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.trainer.data.records import Example, Message

IGNORE = -100
_PROBE = "\u2063tunedock-probe\u2063"


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


class FormattingError(ValueError):
    """An example the base model's chat template cannot format (the message names the example)."""


class ChatFormatter:
    """Token ids and loss labels for examples, with one tokenizer and its chat template."""

    def __init__(self, tokenizer, notice: Callable[[str], None] = lambda message: None) -> None:
        self.tokenizer = tokenizer
        self.notice = notice
        template = getattr(tokenizer, "chat_template", None) or ""
        self.marks_generation = "generation %}" in template
        self._system_ok: bool | None = None
        self._terminator: list[str] | None = None
        self._noticed: set[str] = set()

    # ------------------------------------------------------------------------------ public

    def __call__(self, example: Example, max_len: int) -> Tokenized:
        if example.text is not None:
            ids = self.tokenizer(example.text, add_special_tokens=True)["input_ids"]
            if self.tokenizer.eos_token_id is not None:
                ids = [*ids, self.tokenizer.eos_token_id]
            tokenized = Tokenized(list(ids), list(ids))
        else:
            tokenized = self._chat(example)
        ids, labels = tokenized.input_ids[:max_len], tokenized.labels[:max_len]
        labels[0] = (
            IGNORE  # nothing predicts the first token (and in a packed row it must not see the previous example)
        )
        return Tokenized(ids, labels)

    # -------------------------------------------------------------------------------- chat

    def _chat(self, example: Example) -> Tokenized:
        if not getattr(self.tokenizer, "chat_template", None):
            raise FormattingError(
                f"{example.where}: the base model's tokenizer has no chat template, so chat data cannot be "
                "formatted; use a model with one (an instruct/chat checkpoint) or text records"
            )
        messages = self._fit_system(list(example.messages))
        tools = example.template_tools()
        if tools is not None:
            self._check_tools(messages, tools, example.where)
        chat = [m.to_template() for m in messages]
        learn_all = all(m.learn for m in messages if m.role == "assistant")
        if self.marks_generation and learn_all:
            return self._generation_marks(chat, tools)
        text = self._render(chat, tools, generation_prompt=False, where=example.where)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        labels = [IGNORE] * len(ids)
        cursor = 0
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            span = self._prefix_span(chat, tools, i, text, offsets, example.where)
            if span is None:
                span = self._content_span(message, text, offsets, cursor)
            if span is None:
                raise FormattingError(
                    f"{example.where}: cannot find assistant turn {i} in the conversation as this base model's chat "
                    "template renders it (it neither renders prefixes as prefixes nor keeps the turn's text); "
                    "use a model whose template does, or text records"
                )
            start, end = span
            cursor = offsets[end - 1][1] if end > start else cursor
            if message.learn:
                labels[start:end] = ids[start:end]
        return Tokenized(ids, labels)

    def _generation_marks(self, chat: list[dict], tools) -> Tokenized:
        out = self.tokenizer.apply_chat_template(
            chat, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        return Tokenized(ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)])

    def _render(self, chat: list[dict], tools, generation_prompt: bool, where: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                chat, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja2's TemplateError and friends: the template refused the conversation
            raise FormattingError(f"{where}: the base model's chat template refused the conversation: {exc}") from None

    def _prefix_span(self, chat, tools, i, text, offsets, where) -> tuple[int, int] | None:
        """Tokens of assistant turn i by rendering prefixes; None where prefixes do not render as prefixes."""
        if i == 0:
            return None
        before = self._render(chat[:i], tools, generation_prompt=True, where=where)
        if not text.startswith(before):
            return None
        through = self._render(chat[: i + 1], tools, generation_prompt=False, where=where)
        agree = len(before)
        while agree < min(len(text), len(through)) and text[agree] == through[agree]:
            agree += 1
        start = _first_token_at(offsets, len(before))
        end = start
        while end < len(offsets) and offsets[end][1] <= agree:  # whole tokens only
            end += 1
        return self._trim_whitespace(start, end, offsets, text)

    def _content_span(self, message: Message, text: str, offsets, cursor: int) -> tuple[int, int] | None:
        """Tokens of an assistant turn found by its text, plus the template's end-of-turn tokens."""
        content = message.content.strip()
        if not content:
            return None
        found = text.find(content, cursor)
        if found < 0:
            return None
        start = _first_token_at(offsets, found)
        end = start
        while end < len(offsets) and offsets[end][1] <= found + len(content):
            end += 1
        for piece in self._end_of_turn():
            if end < len(offsets) and text[offsets[end][0] : offsets[end][1]] == piece:
                end += 1
            else:
                break
        return self._trim_whitespace(start, end, offsets, text)

    def _end_of_turn(self) -> list[str]:
        """What the template writes right after an assistant turn's text, as token strings (whitespace dropped)."""
        if self._terminator is None:
            chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE}]
            text = self.tokenizer.apply_chat_template(chat, tokenize=False)
            after = text[text.index(_PROBE) + len(_PROBE) :]
            encoded = self.tokenizer(after, add_special_tokens=False, return_offsets_mapping=True)
            pieces = [after[a:b] for a, b in encoded["offset_mapping"]]
            while pieces and not pieces[-1].strip():
                pieces.pop()
            self._terminator = pieces
        return self._terminator

    @staticmethod
    def _trim_whitespace(start: int, end: int, offsets, text: str) -> tuple[int, int] | None:
        while end > start and not text[offsets[end - 1][0] : offsets[end - 1][1]].strip():
            end -= 1
        return (start, end) if end > start else None

    # ------------------------------------------------------------------ template quirks

    def _fit_system(self, messages: list[Message]) -> list[Message]:
        """Templates without a system role get the system prompt at the head of the first user turn."""
        if not messages or messages[0].role != "system" or self._accepts_system():
            return messages
        system, rest = messages[0], messages[1:]
        self._notice(
            "system-merged",
            "the chat template has no system role: system prompts are put at the head of the first user turn",
        )
        for j, m in enumerate(rest):
            if m.role == "user":
                rest[j] = Message("user", f"{system.content}\n\n{m.content}", m.tool_calls, m.learn)
                return rest
        return rest

    def _accepts_system(self) -> bool:
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

    def _check_tools(self, messages: list[Message], tools: list[dict], where: str) -> None:
        """Tool specs and tool calls must show up in the rendering, or the model would learn calls to nothing."""
        chat = [m.to_template() for m in messages]
        text = self._render(chat, tools, generation_prompt=False, where=where)
        names = [t["function"]["name"] for t in tools]
        called = [c["function"]["name"] for m in chat for c in m.get("tool_calls", [])]
        missing = [n for n in dict.fromkeys(names + called) if n not in text]
        if missing:
            raise FormattingError(
                f"{where}: the base model's chat template does not render tools or tool calls (missing: "
                f"{', '.join(missing)}); tool-calling data needs a template with tool support (Qwen2.5, Llama-3.1, "
                "Mistral's tokenizer v3+)"
            )

    def _notice(self, key: str, message: str) -> None:
        if key not in self._noticed:
            self._noticed.add(key)
            self.notice(message)


def _first_token_at(offsets, char: int) -> int:
    """Index of the first token that starts at or after `char`."""
    for index, (start, _) in enumerate(offsets):
        if start >= char:
            return index
    return len(offsets)
