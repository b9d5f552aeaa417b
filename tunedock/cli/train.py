"""`tunedock train`: build a job spec from options, submit it, watch it to the end."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from tunedock.cli.common import TRAINER, cli_errors, console, err, print_json, sparkline, state_name, succeeded
from tunedock.jobs import DEFAULTS, METHODS

TARGETS = ", ".join(DEFAULTS.target_modules)


def build_spec(
    method: str,
    base: str,
    data: list[str],
    name: str,
    steps: int,
    epochs: float,
    lr: float,
    batch_size: int,
    max_seq_length: int,
    packing: bool,
    r: int | None,
    alpha: float,
    dropout: float,
    target: list[str],
    rslora: bool,
    layers: int,
    modules: list[str],
    extra: list[str],
    quant: str,
    eval_data: list[str],
    validation_split: float,
    grad_ckpt: bool,
    checkpoint_every: int,
    processes: int = 1,
    nodes: int = 1,
):
    from tunedock.v1 import common_pb2
    from tunedock.v1 import trainer_pb2 as pb

    def lora() -> common_pb2.LoraConfig:
        config = common_pb2.LoraConfig(alpha=alpha, dropout=dropout, target_modules=target, use_rslora=rslora)
        if r is not None:
            config.r = r
        return config

    configs = {
        "full": lambda: common_pb2.MethodConfig(full=common_pb2.FullConfig()),
        "freeze": lambda: common_pb2.MethodConfig(
            freeze=common_pb2.FreezeConfig(trainable_layers=layers, trainable_modules=modules, extra_modules=extra)
        ),
        "lora": lambda: common_pb2.MethodConfig(lora=lora()),
        "qlora": lambda: common_pb2.MethodConfig(
            qlora=common_pb2.QLoraConfig(
                lora=lora(), quant_type=common_pb2.QUANT_TYPE_FP4 if quant == "fp4" else common_pb2.QUANT_TYPE_NF4
            )
        ),
    }
    if method not in configs:
        raise ValueError(f"unknown method {method!r}; choose full, freeze, lora or qlora")
    return pb.JobSpec(
        base_model=base,
        method=configs[method](),
        train_dataset_ids=data,
        eval_dataset_ids=eval_data,
        validation_split=validation_split,
        output_name=name,
        hyperparameters=pb.Hyperparameters(
            max_steps=steps,
            epochs=epochs,
            learning_rate=lr,
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            packing=packing,
            gradient_checkpointing=grad_ckpt,
            checkpoint_every_steps=checkpoint_every,
            processes_per_node=processes,
            nodes=nodes,
        ),
    )


def resolve_datasets(client, values: list[str]) -> list[str]:
    """Dataset ids as given, or files and folders uploaded first."""
    ids = []
    for value in values:
        if value.startswith("ds-"):
            ids.append(value)
        elif Path(value).exists():
            ids.append(client.upload_dataset(Path(value)).id)
        else:
            raise FileNotFoundError(f"{value} is neither a dataset id (ds-...) nor a file or folder")
    return ids


def watch_job(client, job_id: str, quiet: bool = False):
    """Live progress: a bar with step/total, loss, tokens/s, ETA and a loss sparkline. Returns the final job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    losses: list[float] = []
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, disable=quiet, transient=False) as progress:
        task = progress.add_task(job_id, total=None, stats="")
        for event in client.watch(job_id, timeout=24 * 3600):
            kind = event.WhichOneof("event")
            if kind == "progress":
                p = event.progress
                if p.tokens_per_second:  # a training step
                    losses.append(p.loss)
                    stats = f"loss {p.loss:.3f}  {p.tokens_per_second:,.0f} tok/s  {sparkline(losses)}"
                else:  # a job without an optimizer (an extraction): modules done
                    stats = f"peak {p.peak_memory_bytes / 2**20:,.0f} MiB"
                progress.update(task, total=p.total_steps, completed=p.step, stats=stats)
            elif kind == "state":
                progress.update(task, description=f"{job_id} {state_name(event.state.state)}")
            elif kind == "log" and not quiet:
                progress.console.print(f"  {escape(event.log.message)}", highlight=False)
            elif kind == "eval" and not quiet:
                progress.console.print(f"  eval loss {event.eval.eval_loss:.4f} at step {event.eval.step}")
    return client.get(job_id)


def follow(client, job, watch: bool, as_json: bool):
    """After a submit: say how to follow the job, or follow it to its end. Returns the succeeded job when
    watched; a job that ended otherwise exits 1 with its error."""
    if not watch:
        print_json(job) if as_json else console.print(f"submitted {job.id}; follow with `tunedock jobs watch {job.id}`")
        return None
    done = watch_job(client, job.id, quiet=as_json)
    if as_json:
        print_json(done)
    return succeeded(done)


def train(
    method: str = typer.Option(..., help="full, freeze, lora or qlora"),
    base: str = typer.Option(
        "",
        help="base model: local directory, cached hub id or registry://name@alias (default: the trainer's default, "
        "the base the stack serves; `tunedock info`)",
    ),
    data: list[str] = typer.Option(..., help="training dataset id or file (repeatable)"),
    name: str = typer.Option("", help="registry name of the output (default: <method>-<base dir name>)"),
    eval_data: list[str] = typer.Option([], help="evaluation dataset id or file (repeatable)"),
    validation_split: float = typer.Option(
        0.0, help="hold out this fraction (>= 1: this many records) for eval without --eval-data"
    ),
    steps: int = typer.Option(0, help="optimizer steps (0: use --epochs)"),
    epochs: float = typer.Option(DEFAULTS.epochs, help="epochs when --steps is 0"),
    lr: float = typer.Option(
        0.0,
        help=f"learning rate (0: {DEFAULTS.adapter_learning_rate:g} LoRA/QLoRA, "
        f"{DEFAULTS.full_learning_rate:g} Full/Freeze)",
    ),
    batch_size: int = typer.Option(DEFAULTS.batch_size),
    max_seq_length: int = typer.Option(DEFAULTS.max_seq_length),
    packing: bool = typer.Option(False, help="pack examples into full sequences"),
    r: int = typer.Option(None, help=f"LoRA rank (default {DEFAULTS.lora_r})"),
    alpha: float = typer.Option(0.0, help=f"LoRA alpha (default {DEFAULTS.lora_alpha_per_rank:g}r)"),
    dropout: float = typer.Option(0.0, help="LoRA dropout"),
    target: list[str] = typer.Option([], help=f"LoRA target module (repeatable; default {TARGETS})"),
    rslora: bool = typer.Option(False, help="rank-stabilized LoRA"),
    layers: int = typer.Option(DEFAULTS.trainable_layers, help="Freeze: last N layers train (negative: first N)"),
    modules: list[str] = typer.Option([], help="Freeze: modules inside those layers (repeatable)"),
    extra: list[str] = typer.Option([], help="Freeze: embed_tokens, norm or lm_head (repeatable)"),
    quant: str = typer.Option(DEFAULTS.quant_type, help="QLoRA: nf4 or fp4"),
    grad_ckpt: bool = typer.Option(False, help="gradient checkpointing"),
    checkpoint_every: int = typer.Option(0, help="checkpoint every N steps"),
    processes: int = typer.Option(1, help="training processes per node (torchrun; one per GPU); batch is per process"),
    nodes: int = typer.Option(1, help="nodes (needs the trainer's Kubernetes executor)"),
    watch: bool = typer.Option(False, "--watch", help="follow progress until the job ends"),
    trainer: str = typer.Option(TRAINER, help="trainer address"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Submit a fine-tune job (and with --watch follow it to the published reference)."""
    _train(**locals())


@cli_errors
def _train(watch, trainer, as_json, **options):
    """`train`'s body: its options are `build_spec`'s arguments, dataset files uploaded first."""
    from tunedock.client import TrainerClient

    method = options["method"]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose full, freeze, lora or qlora")
    with TrainerClient(trainer) as client:
        if not options["name"]:
            base = options["base"] or client.info().default_base_model
            options["name"] = f"{method}-{Path(base).name}".lower().replace("_", "-")
        options["data"] = resolve_datasets(client, options["data"])
        options["eval_data"] = resolve_datasets(client, options["eval_data"])
        done = follow(client, client.submit(build_spec(**options)), watch, as_json)
    if done is not None and not as_json:
        console.print(f"published [green]{done.output_ref}[/green]")
