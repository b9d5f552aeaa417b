"""`tunedock compare`: the four methods measured on your model and data, then served side by side on one engine.

Each method trains on the same data; Full and Freeze results are extracted to LoRA adapters
(their rank, the share of the change they keep and their greedy agreement with the tuned model
are shown), and all four answer the same prompts per request on the inference service.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from tunedock.cli.common import INFERENCE, REGISTRY, TRAINER, cli_errors, console, err, print_json, succeeded
from tunedock.cli.train import build_spec, resolve_datasets
from tunedock.jobs import ADAPTER_METHODS, EXTRACT_DEFAULTS, METHODS

PROMPTS = ["Tell me about the moon.", "What is your favourite thing?"]


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
    serve: bool = typer.Option(
        True, "--serve/--no-serve", help="extract Full and Freeze, then ask all four the prompts on one engine"
    ),
    extract_rank: int = typer.Option(
        0, help="rank of the adapters extracted from Full/Freeze (0: by --extract-energy)"
    ),
    extract_energy: float = typer.Option(
        EXTRACT_DEFAULTS.energy, help="share of the change the extracted adapters keep (rank 0)"
    ),
    prompt: list[str] = typer.Option([], help="prompt every method answers (repeatable; default: two built in)"),
    max_tokens: int = typer.Option(32, help="tokens per answer"),
    out: Path = typer.Option(Path("compare"), help="directory for compare.json and compare.png"),
    trainer: str = typer.Option(TRAINER),
    registry: str = typer.Option(REGISTRY),
    inference: str = typer.Option(INFERENCE, help="inference service serving --base"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run Full, Freeze, LoRA and QLoRA on the same data, print the classic table measured, and serve all four."""
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
    serve,
    extract_rank,
    extract_energy,
    prompt,
    max_tokens,
    out,
    trainer,
    registry,
    inference,
    as_json,
):
    from tunedock import planner
    from tunedock.client import RegistryClient, TrainerClient

    budget = planner.parse_bytes(memory_budget) if memory_budget else None
    rows = []
    tag = os.urandom(3).hex()
    with TrainerClient(trainer) as client, RegistryClient(registry) as reg:
        dataset_ids = resolve_datasets(client, data)
        for method in METHODS:
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
            done, rates = _run(client, client.submit(spec).id, method, as_json)
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
                    "fits_budget": None if budget is None else m["peak_memory_bytes"] <= budget,
                }
            )
        if serve:
            for row in rows:
                _served_as(client, row, tag, extract_rank, extract_energy, as_json)
    answers = _ask(inference, rows, prompt or PROMPTS, max_tokens) if serve else {}
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "base": base,
        "steps": steps,
        "batch_size": batch_size,
        "max_seq_length": max_seq_length,
        "budget_bytes": budget,
        "methods": rows,
        "answers": answers,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    try:
        _chart(rows, out / "compare.png")
        chart = f" and {out / 'compare.png'}"
    except ImportError:
        chart = ""
        err.print("no PNG chart: it needs matplotlib (pip install 'tunedock[plot]'); the table and JSON are written")
    if as_json:
        print_json(report)
        return
    console.print(_table(rows, base, steps, batch_size, max_seq_length, budget, serve))
    if answers:
        console.print(_answers_table(rows, answers))
    if budget:
        console.print(advice(rows, budget), highlight=False)
    console.print(f"wrote {out / 'compare.json'}{chart}")


def _run(client, job_id: str, label: str, quiet: bool):
    """Follow a job to its end, one line per progress event; (the job, tokens/s of each step)."""

    rates = []
    for event in client.watch(job_id, timeout=24 * 3600):
        if event.HasField("progress"):
            p = event.progress
            if p.tokens_per_second:
                rates.append(p.tokens_per_second)
            if not quiet:
                detail = f"loss {p.loss:.3f}" if p.tokens_per_second else "modules"
                err.print(f"  {label:14} {p.step}/{p.total_steps} {detail}", highlight=False)
    return succeeded(client.get(job_id), f"{label} job"), rates


def _served_as(client, row: dict, tag: str, rank: int, energy: float, quiet: bool) -> None:
    """LoRA/QLoRA serve as trained; Full and Freeze through an adapter extracted from them, with its fidelity."""
    if row["method"] in ADAPTER_METHODS:
        row.update(served=row["output"], extract_rank=None, agreement=None, kl=None, served_eval_loss=row["eval_loss"])
        return
    job = client.extract(
        row["output"],
        f"compare-{row['method']}-lora-{tag}",
        rank=rank,
        energy=energy,
        allow_dropped=True,  # a measurement: say how much was dropped rather than refuse
    )
    done, _ = _run(client, job.id, f"{row['method']} extract", quiet)
    m = {x.name: x.value for x in done.metrics}
    row.update(
        served=done.output_ref,
        extract_rank=int(m["extract_rank"]),
        kept=m["extract_retained_energy"],
        dropped=m["extract_dropped_share"],
        agreement=m["extract_greedy_agreement"],
        kl=m["extract_kl_mean"],
        served_eval_loss=m.get("eval_loss_extracted"),
    )


def _ask(address: str, rows: list[dict], prompts: list[str], max_tokens: int) -> dict:
    """{prompt: {column: answer}}: the base and every method's served adapter, all requests sent at once."""
    from tunedock.client import InferenceClient

    columns = {"base": ""} | {row["method"]: row["served"] for row in rows}
    asks = [(p, column) for p in prompts for column in columns]
    with InferenceClient(address, timeout=300) as client:

        def ask(item):
            text, column = item
            reply = client.generate(
                adapter=columns[column], messages=[{"role": "user", "content": text}], max_tokens=max_tokens
            )
            return reply.completions[0].text.strip()

        with ThreadPoolExecutor(len(asks)) as pool:
            texts = list(pool.map(ask, asks))
    answers: dict = {p: {} for p in prompts}
    for (p, column), text in zip(asks, texts, strict=True):
        answers[p][column] = text
    return answers


def _table(rows, base, steps, batch_size, max_seq_length, budget, serve) -> Table:
    from tunedock import planner

    table = Table(
        "method",
        "trainable params",
        "tensor memory",
        "process peak",
        "tokens/s",
        "wall s",
        "eval loss",
        "artifact",
        "served as",
        *(["eval loss served", "greedy agreement"] if serve else []),
        *(["fits"] if budget else []),
        title=f"Four methods on {Path(base).name}: {steps} steps x {batch_size} x {max_seq_length} tokens",
    )
    for r in rows:
        if not serve:
            served = "its LoRA adapter" if r["method"] in ADAPTER_METHODS else "its own model (or extract it)"
        elif r.get("extract_rank") is None:
            served = "its LoRA adapter"
        else:
            served = f"extracted r={r['extract_rank']} ({r['kept']:.0%} kept, {r['dropped']:.0%} dropped)"
        table.add_row(
            r["method"],
            f"{r['trainable_params']:,}",
            planner.human(r["training_memory_bytes"]),
            planner.human(r["peak_memory_bytes"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['wall_time_s']:.1f}",
            _loss(r["eval_loss"]),
            planner.human(r["artifact_bytes"]),
            served,
            *(
                [_loss(r.get("served_eval_loss")), "as trained" if r["agreement"] is None else f"{r['agreement']:.0%}"]
                if serve
                else []
            ),
            *(["yes" if r["fits_budget"] else "no"] if budget else []),
        )
    return table


def _loss(value) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _answers_table(rows, answers: dict) -> Table:
    table = Table(title="Same prompts, each method picked per request on one engine", show_lines=True)
    table.add_column("prompt")
    table.add_column("base")
    for row in rows:
        suffix = "" if row.get("extract_rank") is None else f" (extracted r={row['extract_rank']})"
        table.add_column(row["method"] + suffix)
    for text, by_column in answers.items():
        # Prompts and model outputs as plain text: "[INST]" or "[/b]" in them is not rich markup.
        table.add_row(Text(text), Text(by_column["base"]), *[Text(by_column[row["method"]]) for row in rows])
    return table


def advice(rows: list[dict], budget: int) -> str:
    """Which methods fit, and which to pick, worded as the seed document advises."""
    from tunedock import planner

    fits = [r["method"] for r in rows if r["fits_budget"]]
    head = f"within {planner.human(budget)}: {', '.join(fits) if fits else 'none of the methods'} fit. "
    if "full" in fits:
        return head + (
            "With plenty of data and a need for the best result, Full; for a quick try on a simple task close to "
            "pretraining, Freeze; otherwise LoRA, the usual first choice (quality close to Full at a fraction of "
            "the memory, and it hot-swaps)."
        )
    if "lora" in fits:
        return head + (
            "LoRA is the usual first choice: quality close to Full at a fraction of the memory, and it hot-swaps"
            + ("; Freeze for a quick try on a simple task close to pretraining." if "freeze" in fits else ".")
        )
    if "qlora" in fits:
        return head + "Only QLoRA fits: a 4-bit base is how this model tunes in this memory."
    return head + "Try a smaller model, a shorter max_seq_length, or gradient checkpointing."


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2"]
    panels = [
        ("tensor memory at peak (MiB)", [r["training_memory_bytes"] / 2**20 for r in rows]),
        ("tokens/s", [r["tokens_per_s"] for r in rows]),
        ("trainable params (M)", [r["trainable_params"] / 1e6 for r in rows]),
        ("eval loss (lower is better)", [r["eval_loss"] or 0.0 for r in rows]),
    ]
    served = all("served" in r for r in rows)
    if served:
        panels.append(("greedy agreement as served", [1.0 if r["agreement"] is None else r["agreement"] for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6))
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(names, values, color=colors)
        ax.set_title(title, fontsize=10)
    if served:  # the served adapters' eval loss beside the trained one
        axes[3].scatter(names, [r["served_eval_loss"] or 0.0 for r in rows], color="black", zorder=3, label="served")
        axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
