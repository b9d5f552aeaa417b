"""Client commands of the `tunedock` CLI: data, train, jobs, adapters, generate, chat, compare, plan.

Conventions: `--json` on every read command prints machine-readable output; errors are one
line on stderr, never a traceback. Exit codes: 0 ok, 1 the server refused or the job failed,
2 bad input (missing file, bad option), 3 a service is unreachable, 4 not found.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from services.common.errors import TuneDockError

console = Console()
err = Console(stderr=True)

TRAINER = os.environ.get("TUNEDOCK_TRAINER_ADDRESS", "127.0.0.1:50051")
REGISTRY = os.environ.get("TUNEDOCK_REGISTRY_ADDRESS", "127.0.0.1:50052")
INFERENCE = os.environ.get("TUNEDOCK_INFERENCE_ADDRESS", "127.0.0.1:50053")
SPARK = "▁▂▃▄▅▆▇█"


def fail(message: str, code: int) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """One clear line and a meaningful exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                fail(
                    "cannot reach the TuneDock service; is `tunedock up` running? (addresses: --trainer/--registry/"
                    "--inference or TUNEDOCK_TRAINER_ADDRESS etc.)",
                    3,
                )
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                fail("the service did not answer in time; is `tunedock up` running?", 3)
            if code == grpc.StatusCode.UNAUTHENTICATED:
                fail(f"{exc.details()}; set TUNEDOCK_TOKEN (or TUNEDOCK_TOKEN_FILE) to a token from the admin", 5)
            fail(exc.details() or code.name, 4 if code == grpc.StatusCode.NOT_FOUND else 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as exc:
            fail(str(exc), 2)
        except TuneDockError as exc:
            fail(exc.message, 2)

    return wrapper


def print_json(message_or_obj) -> None:
    if hasattr(message_or_obj, "DESCRIPTOR"):
        message_or_obj = json_format.MessageToDict(message_or_obj)
    print(json.dumps(message_or_obj, indent=2, default=str))


def sparkline(values: list[float], width: int = 40) -> str:
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1)))] for v in values)


# ---------------------------------------------------------------------------------------------- data
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


# --------------------------------------------------------------------------------------------- train
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
    """Dataset ids as given, or files uploaded first."""
    ids = []
    for value in values:
        if value.startswith("ds-"):
            ids.append(value)
        elif Path(value).is_file():
            ids.append(client.upload_dataset(Path(value)).id)
        else:
            raise FileNotFoundError(f"{value} is neither a dataset id (ds-...) nor a file")
    return ids


def watch_job(client, job_id: str, quiet: bool = False):
    """Live progress: a bar with step/total, loss, tokens/s, ETA and a loss sparkline. Returns the final job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from tunedock.v1 import trainer_pb2 as pb

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
                losses.append(p.loss)
                progress.update(
                    task,
                    total=p.total_steps,
                    completed=p.step,
                    stats=f"loss {p.loss:.3f}  {p.tokens_per_second:,.0f} tok/s  {sparkline(losses)}",
                )
            elif kind == "state":
                progress.update(task, description=f"{job_id} {pb.JobState.Name(event.state.state)[10:].lower()}")
            elif kind == "log" and not quiet:
                progress.console.print(f"  {event.log.message}", highlight=False)
            elif kind == "eval" and not quiet:
                progress.console.print(f"  eval loss {event.eval.eval_loss:.4f} at step {event.eval.step}")
    return client.get(job_id)


def train(
    method: str = typer.Option(..., help="full, freeze, lora or qlora"),
    base: str = typer.Option(..., help="base model: local directory, cached hub id or registry://name@alias"),
    data: list[str] = typer.Option(..., help="training dataset id or file (repeatable)"),
    name: str = typer.Option("", help="registry name of the output (default: <method>-<base dir name>)"),
    eval_data: list[str] = typer.Option([], help="evaluation dataset id or file (repeatable)"),
    validation_split: float = typer.Option(0.0, help="hold out this fraction for eval when no --eval-data"),
    steps: int = typer.Option(0, help="optimizer steps (0: use --epochs)"),
    epochs: float = typer.Option(1.0, help="epochs when --steps is 0"),
    lr: float = typer.Option(0.0, help="learning rate (0: 2e-4 LoRA/QLoRA, 2e-5 Full/Freeze)"),
    batch_size: int = typer.Option(4),
    max_seq_length: int = typer.Option(512),
    packing: bool = typer.Option(False, help="pack examples into full sequences"),
    r: int = typer.Option(None, help="LoRA rank (default 8)"),
    alpha: float = typer.Option(0.0, help="LoRA alpha (default 2r)"),
    dropout: float = typer.Option(0.0, help="LoRA dropout"),
    target: list[str] = typer.Option([], help="LoRA target module (repeatable; default all-linear)"),
    rslora: bool = typer.Option(False, help="rank-stabilized LoRA"),
    layers: int = typer.Option(2, help="Freeze: last N layers train (negative: first N)"),
    modules: list[str] = typer.Option([], help="Freeze: modules inside those layers (repeatable)"),
    extra: list[str] = typer.Option([], help="Freeze: embed_tokens, norm or lm_head (repeatable)"),
    quant: str = typer.Option("nf4", help="QLoRA: nf4 or fp4"),
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
    from tunedock.v1 import trainer_pb2 as pb

    method = options["method"]
    if method not in ("full", "freeze", "lora", "qlora"):
        raise ValueError(f"unknown method {method!r}; choose full, freeze, lora or qlora")
    options["name"] = options["name"] or f"{method}-{Path(options['base']).name}".lower().replace("_", "-")
    with TrainerClient(trainer) as client:
        options["data"] = resolve_datasets(client, options["data"])
        options["eval_data"] = resolve_datasets(client, options["eval_data"])
        spec = build_spec(**options)
        job = client.submit(spec)
        if not watch:
            print_json(job) if as_json else console.print(
                f"submitted {job.id}; follow with `tunedock jobs watch {job.id}`"
            )
            return
        done = watch_job(client, job.id, quiet=as_json)
    if as_json:
        print_json(done)
    if done.state != pb.JOB_STATE_SUCCEEDED:
        fail(f"job {done.id} {pb.JobState.Name(done.state)[10:].lower()}: {done.error or 'see `tunedock jobs get`'}", 1)
    if not as_json:
        console.print(f"published [green]{done.output_ref}[/green]")


# ---------------------------------------------------------------------------------------------- jobs
jobs_app = typer.Typer(help="Fine-tune jobs.", no_args_is_help=True)


@jobs_app.command("ls")
@cli_errors
def jobs_ls(trainer: str = typer.Option(TRAINER), as_json: bool = typer.Option(False, "--json")) -> None:
    """List jobs, newest first."""
    from tunedock.client import TrainerClient
    from tunedock.v1 import trainer_pb2 as pb

    with TrainerClient(trainer) as client:
        jobs = list(client.list())
    if as_json:
        print_json([json_format.MessageToDict(j) for j in jobs])
        return
    table = Table("id", "state", "method", "step", "output")
    for j in jobs:
        table.add_row(
            j.id,
            pb.JobState.Name(j.state)[10:].lower(),
            j.spec.method.WhichOneof("config") or "merge",
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
    print_json(job) if as_json else console.print(job)


@jobs_app.command("watch")
@cli_errors
def jobs_watch(job_id: str, trainer: str = typer.Option(TRAINER)) -> None:
    """Follow a job's progress until it ends."""
    from tunedock.client import TrainerClient
    from tunedock.v1 import trainer_pb2 as pb

    with TrainerClient(trainer) as client:
        done = watch_job(client, job_id)
    if done.state != pb.JOB_STATE_SUCCEEDED:
        fail(f"job {job_id} {pb.JobState.Name(done.state)[10:].lower()}: {done.error}", 1)
    console.print(f"published [green]{done.output_ref}[/green]")


@jobs_app.command("cancel")
@cli_errors
def jobs_cancel(job_id: str, trainer: str = typer.Option(TRAINER)) -> None:
    """Cancel a queued or running job."""
    from tunedock.client import TrainerClient

    with TrainerClient(trainer) as client:
        client.cancel(job_id)
    console.print(f"cancelled {job_id}")


# ------------------------------------------------------------------------------------------ adapters
adapters_app = typer.Typer(help="Artifacts in the registry.", no_args_is_help=True)


@adapters_app.command("ls")
@cli_errors
def adapters_ls(
    kind: str = typer.Option("", help="lora_adapter, model or delta"),
    registry: str = typer.Option(REGISTRY),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List artifacts."""
    from tunedock.client import RegistryClient

    with RegistryClient(registry) as client:
        artifacts = list(client.list_artifacts(kind=kind))
    if as_json:
        print_json([json_format.MessageToDict(a) for a in artifacts])
        return
    table = Table("name", "kind", "latest", "aliases", "base")
    for a in artifacts:
        table.add_row(
            a.name,
            a.kind and json_format.MessageToDict(a).get("kind", ""),
            str(a.latest_version),
            ", ".join(f"{k}->{v}" for k, v in sorted(a.aliases.items())),
            a.base_model,
        )
    console.print(table)


@adapters_app.command("get")
@cli_errors
def adapters_get(ref: str, registry: str = typer.Option(REGISTRY), as_json: bool = typer.Option(False, "--json")):
    """Show one version (name, name:3 or name@alias)."""
    from tunedock.client import RegistryClient

    with RegistryClient(registry) as client:
        version = client.get(ref)
    print_json(version) if as_json else console.print(version)


@adapters_app.command("alias")
@cli_errors
def adapters_alias(name: str, alias: str, version: int, registry: str = typer.Option(REGISTRY)) -> None:
    """Point ALIAS of NAME at VERSION."""
    from tunedock.client import RegistryClient

    with RegistryClient(registry) as client:
        reply = client.set_alias(name, alias, version)
    console.print(f"{name}@{alias} -> {version} (was {reply.previous_version or 'unset'})")


@adapters_app.command("download")
@cli_errors
def adapters_download(ref: str, dest: Path, registry: str = typer.Option(REGISTRY)) -> None:
    """Download a version's files into DEST (verified)."""
    from tunedock.client import RegistryClient

    with RegistryClient(registry) as client:
        version = client.download(ref, dest)
    console.print(f"{version.name}:{version.version} -> {dest} ({len(version.files)} files)")


@adapters_app.command("publish")
@cli_errors
def adapters_publish(
    directory: Path,
    name: str = typer.Option(..., help="registry name"),
    kind: str = typer.Option("lora_adapter"),
    registry: str = typer.Option(REGISTRY),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Publish a PEFT adapter (or model) directory, e.g. one trained elsewhere."""
    from tunedock.client import RegistryClient

    with RegistryClient(registry) as client:
        reply = client.publish_dir(directory, name, kind=kind)
    if as_json:
        print_json(reply)
    else:
        dedup = " (identical to an existing version)" if reply.deduplicated else ""
        console.print(f"published {reply.version.name}:{reply.version.version}{dedup}")


# ----------------------------------------------------------------------------------------- generate
@cli_errors
def generate(
    prompt: str,
    adapter: str = typer.Option("", help="adapter reference (default: the base)"),
    max_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0),
    raw: bool = typer.Option(
        False, "--raw", help="send PROMPT as is (default: as a user message through the chat template)"
    ),
    inference: str = typer.Option(INFERENCE),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate from PROMPT, streaming to the terminal.

    PROMPT goes in as a user message through the model's chat template, as training formats chat and
    alpaca data, so a freshly trained adapter answers as it learned; --raw sends the text as is.
    """
    from tunedock.client import InferenceClient

    kwargs = {"max_tokens": max_tokens, "temperature": temperature}
    if not raw:
        prompt, kwargs["messages"] = "", [{"role": "user", "content": prompt}]
    with InferenceClient(inference) as client:
        if as_json:
            print_json(client.generate(prompt, adapter, **kwargs))
            return
        for delta in client.stream(prompt, adapter, **kwargs):
            sys.stdout.write(delta.text_delta)
            sys.stdout.flush()
    sys.stdout.write("\n")


@cli_errors
def chat(
    adapter: str = typer.Option("", help="adapter reference (default: the base)"),
    max_tokens: int = typer.Option(128),
    inference: str = typer.Option(INFERENCE),
) -> None:
    """Interactive chat (the model's chat template is applied); an empty line or Ctrl-D ends it."""
    from tunedock.client import InferenceClient

    messages: list[dict] = []
    with InferenceClient(inference) as client:
        while True:
            try:
                text = input("you> ")
            except EOFError:
                break
            if not text.strip():
                break
            messages.append({"role": "user", "content": text})
            sys.stdout.write("model> ")
            reply = []
            for delta in client.stream(messages=messages, adapter=adapter, max_tokens=max_tokens):
                sys.stdout.write(delta.text_delta)
                sys.stdout.flush()
                reply.append(delta.text_delta)
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})


# ------------------------------------------------------------------------------------------ plan
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
    from tunedock import plan as planner

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
        planner.estimate(shape, m, batch_size, max_seq_length, device, r, layers, grad_ckpt, overhead)
        for m in planner.METHODS
    ]
    if as_json:
        print_json(
            {
                "budget_bytes": budget,
                "methods": [
                    {
                        "method": e.method,
                        "trainable_params": e.trainable,
                        "peak_bytes": e.total,
                        "parts": e.parts,
                        "fits": budget is None or e.total <= budget,
                    }
                    for e in estimates
                ],
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


# --------------------------------------------------------------------------------------- compare
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
    from tunedock import plan as planner
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
    _chart(rows, out / "compare.png")
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


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(adapters_app, name="adapters")
    app.command("train")(train)
    app.command("generate")(generate)
    app.command("chat")(chat)
    app.command("plan")(plan)
    app.command("compare")(compare)
    from tunedock.tokens import tokens_app

    app.add_typer(tokens_app, name="tokens")
