"""`tunedock generate` and `tunedock chat`: the inference service from the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from tunedock.cli.common import INFERENCE, cli_errors, print_json

SYSTEM = typer.Option("", "--system", help="system prompt (rendered by the chat template, as training renders it)")
TOOLS = typer.Option(
    None,
    "--tools",
    help="JSON file with OpenAI tool specs ([{'type': 'function', 'function': {...}}]); calls are printed parsed",
)


def read_tools(path: Path | None) -> list[dict]:
    if path is None:
        return []
    try:
        tools = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--tools") from None
    if not isinstance(tools, list):
        raise typer.BadParameter(f"{path}: expected a JSON list of tool specs", param_hint="--tools")
    return tools


@cli_errors
def generate(
    prompt: str,
    adapter: str = typer.Option("", help="adapter reference (default: the base)"),
    max_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0),
    raw: bool = typer.Option(
        False, "--raw", help="send PROMPT as is (default: as a user message through the chat template)"
    ),
    system: str = SYSTEM,
    tools: Path = TOOLS,
    inference: str = typer.Option(INFERENCE),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate from PROMPT, streaming to the terminal.

    PROMPT goes in as a user message through the model's chat template, as training formats chat and
    alpaca data, so a freshly trained adapter answers as it learned; --raw sends the text as is.
    """
    from tunedock.client import InferenceClient

    kwargs: dict = {"max_tokens": max_tokens, "temperature": temperature, "tools": read_tools(tools)}
    if raw and (system or tools):
        raise typer.BadParameter("--system and --tools go through the chat template: drop --raw", param_hint="--raw")
    if not raw:
        head = [{"role": "system", "content": system}] if system else []
        prompt, kwargs["messages"] = "", [*head, {"role": "user", "content": prompt}]
    with InferenceClient(inference) as client:
        if as_json:
            print_json(client.generate(prompt, adapter, **kwargs))
            return
        calls: dict[tuple[int, int], list[str]] = {}
        for delta in client.stream(prompt, adapter, **kwargs):
            sys.stdout.write(delta.text_delta)
            sys.stdout.flush()
            for piece in delta.tool_calls:
                calls.setdefault((delta.index, piece.index), ["", ""])
                calls[(delta.index, piece.index)][0] += piece.name
                calls[(delta.index, piece.index)][1] += piece.arguments
        for name, arguments in calls.values():
            sys.stdout.write(f"\n[tool call] {name}({arguments})")
    sys.stdout.write("\n")


@cli_errors
def chat(
    adapter: str = typer.Option("", help="adapter reference (default: the base)"),
    max_tokens: int = typer.Option(128),
    system: str = SYSTEM,
    inference: str = typer.Option(INFERENCE),
) -> None:
    """Interactive chat (the model's chat template is applied); an empty line or Ctrl-D ends it."""
    from tunedock.client import InferenceClient

    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    with InferenceClient(inference) as client:
        while True:
            try:
                text = input("you> ")
            except EOFError:
                break
            if not text.strip():
                break
            messages.append({"role": "user", "content": text})
            sys.stdout.write("model> ")
            reply = []
            for delta in client.stream(messages=messages, adapter=adapter, max_tokens=max_tokens):
                sys.stdout.write(delta.text_delta)
                sys.stdout.flush()
                reply.append(delta.text_delta)
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
