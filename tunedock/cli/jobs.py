"""`tunedock jobs`: list, get, watch and cancel fine-tune jobs."""

from __future__ import annotations

import typer
from google.protobuf import json_format
from rich.markup import escape
from rich.table import Table

from tunedock.cli.common import TRAINER, cli_errors, console, print_json, state_name, succeeded
from tunedock.cli.train import watch_job


def job_kind(spec) -> str:
    """full | freeze | lora | qlora | merge | extract."""
    if spec.HasField("extract"):
        return "extract"
    return spec.method.WhichOneof("config") or "merge"


jobs_app = typer.Typer(help="Fine-tune jobs.", no_args_is_help=True)


@jobs_app.command("ls")
@cli_errors
def jobs_ls(trainer: str = typer.Option(TRAINER), as_json: bool = typer.Option(False, "--json")) -> None:
    """List jobs, newest first."""
    from tunedock.client import TrainerClient

    with TrainerClient(trainer) as client:
        jobs = list(client.list())
    if as_json:
        print_json([json_format.MessageToDict(j) for j in jobs])
        return
    table = Table("id", "state", "method", "step", "output")
    for j in jobs:
        table.add_row(
            j.id,
            state_name(j.state),
            job_kind(j.spec),
            f"{j.step}/{j.total_steps}",
            j.output_ref,
        )
    console.print(table)


@jobs_app.command("get")
@cli_errors
def jobs_get(job_id: str, trainer: str = typer.Option(TRAINER), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one job."""
    from tunedock.client import TrainerClient

    with TrainerClient(trainer) as client:
        job = client.get(job_id)
    # The job's error and labels are the server's text: printed as sent, brackets included.
    print_json(job) if as_json else console.print(escape(str(job)), highlight=False)


@jobs_app.command("watch")
@cli_errors
def jobs_watch(job_id: str, trainer: str = typer.Option(TRAINER)) -> None:
    """Follow a job's progress until it ends."""
    from tunedock.client import TrainerClient

    with TrainerClient(trainer) as client:
        done = succeeded(watch_job(client, job_id))
    console.print(f"published [green]{done.output_ref}[/green]")


@jobs_app.command("cancel")
@cli_errors
def jobs_cancel(job_id: str, trainer: str = typer.Option(TRAINER)) -> None:
    """Cancel a queued or running job."""
    from tunedock.client import TrainerClient

    with TrainerClient(trainer) as client:
        client.cancel(job_id)
    console.print(f"cancelled {job_id}")
