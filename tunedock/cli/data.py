"""`tunedock data`: datasets on the trainer."""

from __future__ import annotations

from pathlib import Path

import typer

from tunedock.cli.common import TRAINER, cli_errors, console, print_json

data_app = typer.Typer(help="Datasets on the trainer.", no_args_is_help=True)


@data_app.command("upload")
@cli_errors
def data_upload(
    file: Path,
    name: str = typer.Option("", help="display name (default: the file name)"),
    trainer: str = typer.Option(TRAINER, help="trainer address"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Upload and validate a JSONL / JSON-array dataset (alpaca, chat or text records)."""
    from tunedock.client import TrainerClient

    with TrainerClient(trainer) as client:
        ds = client.upload_dataset(file, name)
    if as_json:
        print_json(ds)
    else:
        console.print(f"{ds.id}  {ds.num_records} records  {ds.size} bytes  ({ds.name})")
