"""`tunedock extract`: a Full or Freeze result becomes a LoRA adapter that inference hot-swaps per request."""

from __future__ import annotations

import typer

from tunedock.cli.common import TRAINER, cli_errors, console
from tunedock.jobs import EXTRACT_DEFAULTS


def extract(
    source: str = typer.Argument(..., help="the Full (model) or Freeze (delta) result: name:version or name@alias"),
    output: str = typer.Option(..., "--output", "-o", help="registry name of the extracted adapter"),
    rank: int = typer.Option(0, help="fixed rank for every module (0: the smallest rank that keeps --energy)"),
    energy: float = typer.Option(
        0.0, help=f"share of the change to keep when --rank is 0 (default {EXTRACT_DEFAULTS.energy:g})"
    ),
    max_rank: int = typer.Option(0, help="rank cap (default: the trainer's max_lora_rank, the replicas' limit)"),
    base: str = typer.Option("", help="base model (default: the one the source was trained from)"),
    allow_dropped: bool = typer.Option(
        False, "--allow-dropped", help="extract even when much of the change is in embeddings/lm_head/norms"
    ),
    max_dropped_share: float = typer.Option(
        0.0, help=f"share of the change those may hold (default {EXTRACT_DEFAULTS.max_dropped_share:g})"
    ),
    eval_data: list[str] = typer.Option(
        [], help="dataset id or file to measure fidelity on (default: the source job's eval split)"
    ),
    watch: bool = typer.Option(False, "--watch", help="follow progress until the adapter is published"),
    trainer: str = typer.Option(TRAINER, help="trainer address"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Extract a LoRA adapter from a Full or Freeze result, and measure how faithful it is."""
    _extract(**locals())


@cli_errors
def _extract(
    source, output, rank, energy, max_rank, base, allow_dropped, max_dropped_share, eval_data, watch, trainer, as_json
):
    from tunedock.cli.train import follow, resolve_datasets
    from tunedock.client import TrainerClient

    with TrainerClient(trainer) as client:
        job = client.extract(
            source,
            output,
            rank=rank,
            energy=energy,
            max_rank=max_rank,
            base_model=base,
            allow_dropped=allow_dropped,
            max_dropped_share=max_dropped_share,
            eval_dataset_ids=resolve_datasets(client, eval_data),
        )
        done = follow(client, job, watch, as_json)
    if done is not None and not as_json:
        m = {x.name: x.value for x in done.metrics}
        console.print(
            f"published [green]{done.output_ref}[/green]: rank {m.get('extract_rank', 0):.0f}, keeps "
            f"{m.get('extract_retained_energy', 0):.1%} of the change, greedy agreement "
            f"{m.get('extract_greedy_agreement', 0):.1%}, mean KL {m.get('extract_kl_mean', 0):.4f}"
        )
