"""The `tunedock` command line: one module per command group, all registered here.

The client commands (info, data, train, extract, jobs, adapters, generate, chat, compare, tokens) need only
the client install (grpcio, protobuf, typer, rich); `up`, `demo`, `tiny-model` and `plan` run
server or training code and say which extra to install when it is missing.
"""

from __future__ import annotations

import sys

import typer

from tunedock.cli import adapters, compare, data, extract, generate, info, jobs, plan, stack, tokens, train

app = typer.Typer(
    help="TuneDock: fine-tune, register and serve LLM adapters.", no_args_is_help=True, pretty_exceptions_enable=False
)
app.add_typer(data.data_app, name="data")
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(adapters.adapters_app, name="adapters")
app.add_typer(tokens.tokens_app, name="tokens")
app.command("train")(train.train)
app.command("extract")(extract.extract)
app.command("generate")(generate.generate)
app.command("chat")(generate.chat)
app.command("plan")(plan.plan)
app.command("compare")(compare.compare)
app.command("info")(info.info)
for name, command in stack.COMMANDS:
    app.command(name)(command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
