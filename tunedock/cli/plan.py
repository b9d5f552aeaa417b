"""`tunedock plan`: peak training memory per method, estimated before training."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tunedock.cli.common import cli_errors, console, print_json, require
from tunedock.jobs import METHODS


@cli_errors
def plan(
    base: str = typer.Option(..., help="model directory"),
    memory_budget: str = typer.Option("", help="e.g. 24GiB: say which methods fit"),
    batch_size: int = typer.Option(4),
    max_seq_length: int = typer.Option(512),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    r: int = typer.Option(16, help="LoRA rank"),
    layers: int = typer.Option(2, help="Freeze: trainable layers"),
    grad_ckpt: bool = typer.Option(False),
    engine_share: float = typer.Option(
        0.0,
        help="share of the GPU's memory an inference engine on the same GPU takes (its --gpu-memory-utilization); "
        "0 when training has GPUs of its own",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Estimate peak memory per method before training, and which fit a budget."""
    require("server", ("safetensors", "numpy"), "tunedock plan (it reads the checkpoint's tensor shapes)")
    from tunedock import planner

    path = Path(base)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{base} is not a model directory with config.json")
    if not 0.0 <= engine_share < 1.0:
        raise ValueError(f"--engine-share must be in [0, 1), got {engine_share}")
    budget = planner.parse_bytes(memory_budget) if memory_budget else None
    if budget is not None and engine_share:
        budget = int(budget * (1.0 - engine_share))  # what the engine leaves for training
    shape = planner.read_shape(path)
    overhead = planner.runtime_overhead(device)
    estimates = [
        planner.estimate(shape, m, batch_size, max_seq_length, device, r, layers, grad_ckpt, overhead) for m in METHODS
    ]
    if as_json:
        print_json(
            {
                "budget_bytes": budget,
                "methods": [e.as_dict() | {"fits": budget is None or e.total <= budget} for e in estimates],
            }
        )
        return
    table = Table(
        "method",
        "trainable params",
        "estimated peak",
        "weights",
        "grads+optimizer",
        "activations",
        "runtime",
        *(["fits"] if budget else []),
        title=f"Peak memory estimate: {path.name}, batch {batch_size} x {max_seq_length} tokens, {device}",
    )
    for e in estimates:
        p = e.parts
        table.add_row(
            e.method,
            f"{e.trainable:,}",
            planner.human(e.total),
            planner.human(p["weights"]),
            planner.human(p["gradients"] + p["optimizer"]),
            planner.human(p["activations"]),
            planner.human(p["runtime"]),
            *(["yes" if e.total <= budget else "no"] if budget else []),
        )
    console.print(table)
    if budget:
        fitting = [e.method for e in estimates if e.total <= budget]
        console.print(f"within {planner.human(budget)}: {', '.join(fitting) if fitting else 'none of the methods'}")
