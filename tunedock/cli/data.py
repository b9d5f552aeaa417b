"""`tunedock data`: datasets on the trainer."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from tunedock.cli.common import TRAINER, cli_errors, console, print_json

data_app = typer.Typer(help="Datasets on the trainer.", no_args_is_help=True)


@data_app.command("upload")
@cli_errors
def data_upload(
    file: Path = typer.Argument(..., help="a file (JSONL, JSON, Parquet, CSV/TSV, Arrow) or a folder"),
    name: str = typer.Option("", help="display name (default: the file name)"),
    dataset: str = typer.Option("", help="a LLaMA-Factory folder: the dataset_info.json entry to read"),
    split: str = typer.Option("", help="a `datasets` DatasetDict folder: the split to read (default train)"),
    trainer: str = typer.Option(TRAINER, help="trainer address"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Upload and validate a dataset (alpaca, chat or text records), from a file or a folder.

    Folders: a `datasets` save_to_disk directory, a folder of shards (one kind of file), or a
    LLaMA-Factory data folder (dataset_info.json with its columns, tags, split and num_samples).
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from tunedock.client import TrainerClient

    with (
        TrainerClient(trainer) as client,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
            disable=as_json or not console.is_terminal,
        ) as bar,
    ):
        task = bar.add_task(f"uploading {file.name}", total=None)

        def sent(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            if done == total:
                bar.update(task, description=f"validating {file.name} on the trainer")

        ds = client.upload_dataset(file, name, dataset=dataset, split=split, progress=sent)
    if as_json:
        print_json(ds)
    else:
        console.print(f"{ds.id}  {ds.num_records} records  {ds.size} bytes  ({escape(ds.name)})", highlight=False)
