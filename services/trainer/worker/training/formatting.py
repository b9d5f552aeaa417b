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
tool support, and one whose template cannot render tools is refused. All of that is
`services.common.chat.ChatRenderer`, which serving renders prompts with too: an adapter is served
exactly the tokens it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.common.chat import ChatRenderer, ConversationError
from services.trainer.data.records import Example

IGNORE = -100
_PROBE = "\u2063tunedock-probe\u2063"


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    full_length: int = 0
    """Tokens before truncation to max_seq_length (0: not recorded)."""

    @property
    def loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


class FormattingError(ValueError):
    """An example the base model's chat template cannot format (the message names the example)."""


class ChatFormatter:
    """Token ids and loss labels for examples, with one tokenizer and its chat template."""

    def __init__(self, tokenizer, notice: Callable[[str], None] = lambda message: None) -> None:
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer, notice)
        self.marks_generation = "generation %}" in self.renderer.template
        self._terminator: list[str] | None = None

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
        return Tokenized(ids, labels, len(tokenized.input_ids))

    # -------------------------------------------------------------------------------- chat

    def _chat(self, example: Example) -> Tokenized:
        if not self.renderer.has_template:
            raise FormattingError(
                f"{example.where}: the base model's tokenizer has no chat template, so chat data cannot be "
                "formatted; use a model with one (an instruct/chat checkpoint) or text records"
            )
        whole = [m.to_template() for m in example.messages]
        chat = self.renderer.fit_system(whole)
        learn = [m.learn for m in example.messages][len(whole) - len(chat) :]  # a merged system turn goes first
        tools = example.template_tools()
        if tools is not None:
            try:
                self.renderer.check_tools(chat, tools)
            except ConversationError as exc:
                raise FormattingError(f"{example.where}: {exc}") from None
        learn_all = all(keep for m, keep in zip(chat, learn, strict=True) if m["role"] == "assistant")
        if self.marks_generation and learn_all:
            return self._generation_marks(chat, tools)
        text = self._render(chat, tools, generation_prompt=False, where=example.where)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        labels = [IGNORE] * len(ids)
        cursor = 0
        for i, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            span = self._prefix_span(chat, tools, i, text, offsets, example.where)
            if span is None:
                span = self._content_span(message["content"], text, offsets, cursor)
            if span is None:
                raise FormattingError(
                    f"{example.where}: cannot find assistant turn {i} in the conversation as this base model's chat "
                    "template renders it (it neither renders prefixes as prefixes nor keeps the turn's text); "
                    "use a model whose template does, or text records"
                )
            start, end = span
            cursor = offsets[end - 1][1] if end > start else cursor
            if learn[i]:
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
            return self.renderer.render(chat, tools, generation_prompt)
        except ConversationError as exc:
            raise FormattingError(f"{where}: {exc}") from None

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

    def _content_span(self, content: str, text: str, offsets, cursor: int) -> tuple[int, int] | None:
        """Tokens of an assistant turn found by its text, plus the template's end-of-turn tokens."""
        content = content.strip()
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


def _first_token_at(offsets, char: int) -> int:
    """Index of the first token that starts at or after `char`."""
    for index, (start, _) in enumerate(offsets):
        if start >= char:
            return index
    return len(offsets)
