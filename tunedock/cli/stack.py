"""`tunedock up`, `tunedock demo`, `tunedock tiny-model`: the whole stack on this machine (needs the server extras)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from tunedock.cli.common import console, err, require

STACK = ("torch", "transformers", "sqlalchemy", "vllm")

COMMANDS: list = []


def stack_app_command(name: str | None = None):
    def register(fn):
        COMMANDS.append((name, fn))
        return fn

    return register


def _stop_on_sigterm(*_args) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack the same way Ctrl-C does


def _home(data_dir: Path | None) -> Path:
    from tunedock.tiny_model import default_home

    return (data_dir or default_home()).expanduser()


@stack_app_command("tiny-model")
def tiny_model(
    seed: int = typer.Option(0, help="seed of the random initialisation"),
    cache_dir: Path = typer.Option(None, help="where models are cached (default $TUNEDOCK_HOME/models)"),
    force: bool = typer.Option(False, help="rebuild even if cached"),
) -> None:
    """Build (or reuse) the tiny local Llama model and print its directory."""
    require("train", ("torch", "transformers", "tokenizers"), "tunedock tiny-model")
    from tunedock.tiny_model import TinyModelSpec, build_tiny_model

    print(build_tiny_model(TinyModelSpec(seed=seed), cache_dir, force=force))


@stack_app_command()
def up(
    data_dir: Path = typer.Option(None, help="state directory (default $TUNEDOCK_HOME or ~/.tunedock)"),
    base_model: str = typer.Option("", help="base model for inference (hub id or path); default: the tiny model"),
    host: str = typer.Option("127.0.0.1", help="address the services bind to"),
    port_offset: int = typer.Option(0, help="added to the default ports 50051-50054, 9451-9453 and 8000"),
    check: bool = typer.Option(False, help="start, check health, print the status table, stop"),
) -> None:
    """Start trainer, adapter registry and inference locally; Ctrl-C stops them."""
    require("cpu", STACK, "tunedock up")
    from tunedock.cli.local_stack import SERVICES, LocalStack

    home = _home(data_dir)
    if not base_model:
        from tunedock.tiny_model import build_tiny_model

        with console.status("building the tiny model (cached after the first run)"):
            base_model = str(build_tiny_model(cache_dir=home / "models"))
    stack = LocalStack(home, host=host, base_model=base_model, port_offset=port_offset)
    try:
        stack.start()
        with console.status("waiting for the services to become healthy"):
            status = stack.wait_healthy()
    except RuntimeError as exc:
        stack.stop()
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    table = Table(title=f"TuneDock (data and logs: {home})")
    for column in ("service", "address", "health", "metrics"):
        table.add_column(column)
    for module, _, _, metrics_port in SERVICES:
        table.add_row(
            module, stack.address(module), status[module], f"http://{host}:{metrics_port + port_offset}/metrics"
        )
    console.print(table)
    creds = stack.credentials
    console.print(
        f"authentication on: admin token in {creds.admin_token_file} (the CLI reads $TUNEDOCK_HOME/token; "
        f"elsewhere set TUNEDOCK_TOKEN_FILE={creds.admin_token_file}); add people with "
        f"`tunedock tokens create NAME -r ROLE -p PROJECT -f {creds.token_file}`"
    )
    console.print(
        f"OpenAI-compatible API: {stack.openai_base_url} (api_key: a TuneDock token; model: the base's id or an "
        "adapter ref, e.g. pirate@prod; files and fine-tuning jobs too: client.fine_tuning.jobs.create; see "
        "docs/clients.md)"
    )
    if check:
        codes = stack.stop()
        bad = {m: c for m, c in codes.items() if c != 0}
        if bad:
            err.print(f"[red]error:[/red] services did not stop cleanly: {bad}")
            raise typer.Exit(1)
        console.print("all three services were healthy and stopped cleanly")
        return
    console.print("press Ctrl-C to stop")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(0.5)
        dead = [m for m, p in stack.processes.items() if p.poll() is not None]
        err.print(f"[red]error:[/red] {', '.join(dead)} exited; see the logs above. Stopping the rest.")
        stack.stop()
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping ...")
        stack.stop()


@stack_app_command()
def demo(
    data_dir: Path = typer.Option(None, help="state directory (default $TUNEDOCK_HOME or ~/.tunedock)"),
    base_model: str = typer.Option("", help="base model (default: the tiny local model)"),
    port_offset: int = typer.Option(0, help="added to the default ports"),
) -> None:
    """The end-to-end demo: train LoRA, QLoRA and Freeze, publish, hot-swap adapters per request."""
    require("cpu", STACK, "tunedock demo")
    from tunedock.cli.demo import run_demo

    home = _home(data_dir)
    if not base_model:
        from tunedock.tiny_model import build_tiny_model

        with console.status("building the tiny model (cached after the first run)"):
            base_model = str(build_tiny_model(cache_dir=home / "models"))
    raise typer.Exit(run_demo(home, base_model, port_offset, console))
