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


def _format_name(fmt: int) -> str:
    from tunedock.v1 import trainer_pb2 as pb

    return pb.DatasetFormat.Name(fmt).removeprefix("DATASET_FORMAT_").lower()


@data_app.command("ls")
@cli_errors
def data_ls(
    project: str = typer.Option("", help="only this project's datasets"),
    trainer: str = typer.Option(TRAINER, help="trainer address"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List datasets, newest first."""
    from google.protobuf import json_format
    from rich.table import Table
    from rich.text import Text

    from tunedock.client import TrainerClient

    with TrainerClient(trainer) as client:
        datasets = list(client.list_datasets(project))
    if as_json:
        print_json([json_format.MessageToDict(d) for d in datasets])
        return
    table = Table("id", "name", "format", "records", "source", "project")
    for d in datasets:
        table.add_row(d.id, Text(d.name), _format_name(d.format), f"{d.num_records:,}", d.stats.source, d.project)
    console.print(table)


@data_app.command("get")
@cli_errors
def data_get(
    dataset_id: str,
    trainer: str = typer.Option(TRAINER, help="trainer address"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Show one dataset: format, records, what validation measured."""
    from tunedock.client import TrainerClient
    from tunedock.v1 import trainer_pb2 as pb

    with TrainerClient(trainer) as client:
        d = client.get_dataset(dataset_id)
    if as_json:
        print_json(d)
        return
    s = d.stats
    lines = [
        f"{d.id}  {escape(d.name)}  ({d.project})",
        f"  format      {_format_name(d.format)}, from {s.source or 'unknown'}",
        f"  records     {d.num_records:,}  ({d.size:,} bytes stored)",
        f"  characters  p50 {s.chars_p50:,}, p95 {s.chars_p95:,}, max {s.chars_max:,} per record",
    ]
    if d.format == pb.DATASET_FORMAT_CHAT:
        lines.append(
            f"  chat        {s.mean_messages:.1f} messages a record, {s.records_with_tools:,} with tools, "
            f"{s.records_with_system:,} with a system prompt"
        )
    if d.ignored_columns:
        lines.append(f"  ignored     {', '.join(d.ignored_columns)}")
    lines.append("  tokens      per base: each job reports them under its base's template")
    console.print("\n".join(lines), highlight=False)


@data_app.command("rm")
@cli_errors
def data_rm(
    dataset_id: str,
    trainer: str = typer.Option(TRAINER, help="trainer address"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
) -> None:
    """Delete a dataset and free its bytes (refused while a job that has not ended uses it)."""
    from tunedock.client import TrainerClient

    if not yes:
        typer.confirm(f"delete {dataset_id}?", abort=True)
    with TrainerClient(trainer) as client:
        gone = client.delete_dataset(dataset_id)
    console.print(f"deleted {gone.id} ({escape(gone.name)}, {gone.num_records:,} records)", highlight=False)
