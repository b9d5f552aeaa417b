"""`tunedock generate` and `tunedock chat`: the inference service from the terminal."""

from __future__ import annotations

import sys

import typer

from tunedock.cli.common import INFERENCE, cli_errors, print_json


@cli_errors
def generate(
    prompt: str,
    adapter: str = typer.Option("", help="adapter reference (default: the base)"),
    max_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0),
    raw: bool = typer.Option(
        False, "--raw", help="send PROMPT as is (default: as a user message through the chat template)"
    ),
    inference: str = typer.Option(INFERENCE),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate from PROMPT, streaming to the terminal.

    PROMPT goes in as a user message through the model's chat template, as training formats chat and
    alpaca data, so a freshly trained adapter answers as it learned; --raw sends the text as is.
    """
    from tunedock.client import InferenceClient

    kwargs: dict = {"max_tokens": max_tokens, "temperature": temperature}
    if not raw:
        prompt, kwargs["messages"] = "", [{"role": "user", "content": prompt}]
    with InferenceClient(inference) as client:
        if as_json:
            print_json(client.generate(prompt, adapter, **kwargs))
            return
        for delta in client.stream(prompt, adapter, **kwargs):
            sys.stdout.write(delta.text_delta)
            sys.stdout.flush()
    sys.stdout.write("\n")


@cli_errors
def chat(
    adapter: str = typer.Option("", help="adapter reference (default: the base)"),
    max_tokens: int = typer.Option(128),
    inference: str = typer.Option(INFERENCE),
) -> None:
    """Interactive chat (the model's chat template is applied); an empty line or Ctrl-D ends it."""
    from tunedock.client import InferenceClient

    messages: list[dict] = []
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
