"""`tunedock compare`: the four methods measured on your model and data, as the classic table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from tunedock.cli.common import REGISTRY, TRAINER, cli_errors, console, err, fail, print_json
from tunedock.cli.train import build_spec, resolve_datasets


def compare(
    base: str = typer.Option(..., help="base model directory (or cached hub id)"),
    data: list[str] = typer.Option(..., help="dataset id or file (repeatable)"),
    steps: int = typer.Option(30),
    batch_size: int = typer.Option(4),
    max_seq_length: int = typer.Option(256),
    lr: float = typer.Option(1e-3),
    packing: bool = typer.Option(True),
    validation_split: float = typer.Option(0.2, help="held out for the eval loss"),
    memory_budget: str = typer.Option("", help="e.g. 24GiB: say which methods fit"),
    out: Path = typer.Option(Path("compare"), help="directory for compare.json and compare.png"),
    trainer: str = typer.Option(TRAINER),
    registry: str = typer.Option(REGISTRY),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run Full, Freeze, LoRA and QLoRA on the same data and print the classic table, measured."""
    _compare(**locals())


@cli_errors
def _compare(
    base,
    data,
    steps,
    batch_size,
    max_seq_length,
    lr,
    packing,
    validation_split,
    memory_budget,
    out,
    trainer,
    registry,
    as_json,
):
    from tunedock.cli import planner
    from tunedock.client import RegistryClient, TrainerClient
    from tunedock.v1 import trainer_pb2 as pb

    budget = planner.parse_bytes(memory_budget) if memory_budget else None
    rows = []
    with TrainerClient(trainer) as client, RegistryClient(registry) as reg:
        dataset_ids = resolve_datasets(client, data)
        tag = os.urandom(3).hex()
        for method in planner.METHODS:
            spec = build_spec(
                method=method,
                base=base,
                data=dataset_ids,
                name=f"compare-{method}-{tag}",
                steps=steps,
                epochs=0.0,
                lr=lr,
                batch_size=batch_size,
                max_seq_length=max_seq_length,
                packing=packing,
                r=16,
                alpha=32.0,
                dropout=0.0,
                target=[],
                rslora=False,
                layers=2,
                modules=[],
                extra=[],
                quant="nf4",
                eval_data=[],
                validation_split=validation_split,
                grad_ckpt=False,
                checkpoint_every=0,
            )
            job = client.submit(spec)
            rates = []
            for event in client.watch(job.id, timeout=24 * 3600):
                if event.HasField("progress"):
                    rates.append(event.progress.tokens_per_second)
                    if not as_json:
                        err.print(
                            f"  {method:6} step {event.progress.step}/{event.progress.total_steps} "
                            f"loss {event.progress.loss:.3f}",
                            highlight=False,
                        )
            done = client.get(job.id)
            if done.state != pb.JOB_STATE_SUCCEEDED:
                fail(f"{method} job {done.id} ended {pb.JobState.Name(done.state)[10:].lower()}: {done.error}", 1)
            m = {x.name: x.value for x in done.metrics}
            timed = rates[1:] or rates
            rows.append(
                {
                    "method": method,
                    "trainable_params": int(m["trainable_params"]),
                    "total_params": int(m["total_params"]),
                    "peak_memory_bytes": int(m["peak_memory_bytes"]),
                    "training_memory_bytes": int(m.get("training_memory_bytes", m["peak_memory_bytes"])),
                    "runtime_memory_bytes": int(m.get("runtime_memory_bytes", 0)),
                    "tokens_per_s": sum(timed) / max(len(timed), 1),
                    "wall_time_s": m["wall_time_s"],
                    "train_loss": m["train_loss"],
                    "eval_loss": m.get("eval_loss"),
                    "artifact_bytes": reg.get(done.output_ref).size,
                    "output": done.output_ref,
                    "hot_swaps": method in ("lora", "qlora"),
                    "fits_budget": None if budget is None else m["peak_memory_bytes"] <= budget,
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "base": base,
        "steps": steps,
        "batch_size": batch_size,
        "max_seq_length": max_seq_length,
        "budget_bytes": budget,
        "methods": rows,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    try:
        _chart(rows, out / "compare.png")
    except ImportError:
        err.print("no PNG chart: it needs matplotlib (pip install 'tunedock[plot]'); the table and JSON are written")
    if as_json:
        print_json(report)
        return
    table = Table(
        "method",
        "trainable params",
        "tensor memory",
        "process peak",
        "tokens/s",
        "wall s",
        "eval loss",
        "artifact",
        "hot-swaps",
        *(["fits"] if budget else []),
        title=f"Four methods on {Path(base).name}: {steps} steps x {batch_size} x {max_seq_length} tokens",
    )
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['trainable_params']:,}",
            planner.human(r["training_memory_bytes"]),
            planner.human(r["peak_memory_bytes"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['wall_time_s']:.1f}",
            f"{r['eval_loss']:.3f}" if r["eval_loss"] is not None else "-",
            planner.human(r["artifact_bytes"]),
            "yes" if r["hot_swaps"] else "no (own model)",
            *(["yes" if r["fits_budget"] else "no"] if budget else []),
        )
    console.print(table)
    if budget:
        fitting = [r["method"] for r in rows if r["fits_budget"]]
        console.print(
            f"within {planner.human(budget)}: {', '.join(fitting) if fitting else 'none of the methods'}"
            + (f"; the lightest that fits is {fitting[0]}" if fitting else "")
        )
    console.print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [
        ("tensor memory at peak (MiB)", [r["training_memory_bytes"] / 2**20 for r in rows]),
        ("tokens/s", [r["tokens_per_s"] for r in rows]),
        ("trainable params (M)", [r["trainable_params"] / 1e6 for r in rows]),
    ]
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(names, values, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
