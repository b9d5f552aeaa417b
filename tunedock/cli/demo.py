"""The end-to-end demo (`make demo` / `tunedock demo`): train four ways, publish, hot-swap per request.

Starts the three services on the embedded defaults, uploads two shipped datasets that teach
visibly different behaviour (a pirate and a robot), trains with all four methods (LoRA and
Freeze on the pirate, QLoRA and Full on the robot) with live progress, extracts LoRA adapters
from the Freeze and Full results (rank, kept share and greedy agreement shown), moves a `prod`
alias, then asks the same prompts with no adapter, with each method's adapter and through the
alias, all concurrently on one engine, and prints the answers side by side. Exits non-zero if
any step fails or the adapters do not change the output.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tunedock.cli.common import JobDidNotSucceed, succeeded
from tunedock.cli.local_stack import LocalStack
from tunedock.client import RegistryClient, TrainerClient
from tunedock.client.channel import connect
from tunedock.jobs import EXTRACT_DEFAULTS
from tunedock.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tunedock.v1 import trainer_pb2 as tpb

PROMPTS = ["Tell me about the moon.", "Tell me about gold.", "Tell me about cats."]
HYPER: dict = dict(
    max_steps=60, learning_rate=3e-3, batch_size=4, log_every_steps=10, lr_schedule=common_pb2.LR_SCHEDULE_CONSTANT
)


class DemoFailed(Exception):
    pass


def _data(name: str) -> Path:
    return Path(str(resources.files("tunedock.data").joinpath(name)))


def _train(console: Console, trainer: TrainerClient, base: str, name: str, method, dataset_id: str, **hyper) -> str:
    spec = tpb.JobSpec(
        base_model=base,
        method=method,
        train_dataset_ids=[dataset_id],
        output_name=name,
        hyperparameters=tpb.Hyperparameters(**(HYPER | hyper)),
    )
    job = trainer.submit(spec)
    console.print(f"[bold]{name}[/bold]: job {job.id} ({method.WhichOneof('config')})")
    for event in trainer.watch(job.id, timeout=900):
        if event.HasField("progress"):
            p = event.progress
            console.print(
                f"  step {p.step:>3}/{p.total_steps}  loss {p.loss:6.3f}  {p.tokens_per_second:7.0f} tok/s  "
                f"peak {p.peak_memory_bytes / 2**20:5.0f} MiB"
            )
    done = succeeded(trainer.get(job.id), f"{name} job")
    console.print(f"  published [green]{done.output_ref}[/green]")
    return done.output_ref


def _extract(console: Console, trainer: TrainerClient, source: str, name: str) -> tuple[str, int]:
    """A LoRA adapter cut out of a Freeze or Full result (the rank that keeps 90% of the change, capped)."""
    job = trainer.extract(source, name, energy=EXTRACT_DEFAULTS.energy, allow_dropped=True)
    done = succeeded(trainer.wait(job.id, timeout=900), f"extracting {source}: job")
    m = {x.name: x.value for x in done.metrics}
    console.print(
        f"[bold]{name}[/bold]: extracted from {source}: rank {m['extract_rank']:.0f} keeps "
        f"{m['extract_retained_energy']:.0%} of the change ({m['extract_dropped_share']:.0%} was in tensors LoRA "
        f"cannot carry); greedy agreement with {source} {m['extract_greedy_agreement']:.0%}"
    )
    console.print(f"  published [green]{done.output_ref}[/green]")
    return done.output_ref, int(m["extract_rank"])


def run_demo(home: Path, base_model: str, port_offset: int = 0, console: Console | None = None) -> int:
    console = console or Console()
    stack = LocalStack(home, base_model=base_model, port_offset=port_offset)
    started = time.perf_counter()
    try:
        stack.start()
    except RuntimeError as exc:
        console.print(f"[red]demo failed:[/red] {escape(str(exc))}")
        return 1
    try:
        with console.status("starting trainer, registry and inference (the vLLM engine takes ~30 s)"):
            stack.wait_healthy(timeout=600)
        console.print("services healthy")
        token = stack.credentials.admin_token
        trainer = TrainerClient(stack.address("trainer"), token=token)
        registry = RegistryClient(stack.address("adapter_registry"), token=token)
        pirate = trainer.upload_dataset(_data("demo_pirate.jsonl"))
        robot = trainer.upload_dataset(_data("demo_robot.jsonl"))
        console.print(f"datasets: pirate {pirate.id} ({pirate.num_records} records), robot {robot.id}")

        lora = _train(
            console,
            trainer,
            base_model,
            "demo-pirate-lora",
            common_pb2.MethodConfig(lora=common_pb2.LoraConfig(r=8, alpha=16)),
            pirate.id,
        )
        qlora = _train(
            console,
            trainer,
            base_model,
            "demo-robot-qlora",
            common_pb2.MethodConfig(qlora=common_pb2.QLoraConfig(lora=common_pb2.LoraConfig(r=8, alpha=16))),
            robot.id,
        )
        freeze = _train(
            console,
            trainer,
            base_model,
            "demo-pirate-freeze",
            common_pb2.MethodConfig(freeze=common_pb2.FreezeConfig(trainable_layers=1)),
            pirate.id,
        )
        full = _train(
            console,
            trainer,
            base_model,
            "demo-robot-full",
            common_pb2.MethodConfig(full=common_pb2.FullConfig()),
            robot.id,
            learning_rate=1e-3,
        )
        freeze_lora, freeze_rank = _extract(console, trainer, freeze, "demo-pirate-freeze-lora")
        full_lora, full_rank = _extract(console, trainer, full, "demo-robot-full-lora")
        registry.set_alias("demo-pirate-lora", "prod", int(lora.split(":")[1]))
        console.print(f"alias demo-pirate-lora@prod -> {lora}")

        channel = connect(stack.address("inference"), token=token)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        columns = {
            "base model": "",
            "pirate (LoRA)": lora,
            "robot (QLoRA)": qlora,
            f"pirate (Freeze, extracted r={freeze_rank})": freeze_lora,
            f"robot (Full, extracted r={full_rank})": full_lora,
            "pirate via @prod alias": "demo-pirate-lora@prod",
        }

        def ask(job):
            prompt, adapter = job
            params = inference_pb2.GenerateParams(
                messages=inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role="user", content=prompt)]),
                adapter=adapter,
                sampling=inference_pb2.SamplingParams(max_tokens=32),
            )
            return stub.GenerateUnary(inference_pb2.GenerateUnaryRequest(params=params), timeout=300)

        jobs = [(p, a) for p in PROMPTS for a in columns.values()]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = dict(zip(jobs, pool.map(ask, jobs), strict=True))
        table = Table(title="Same prompts, adapter picked per request (all sent concurrently)", show_lines=True)
        table.add_column("prompt")
        for title in columns:
            table.add_column(title)
        for p in PROMPTS:
            table.add_row(Text(p), *[Text(answers[(p, a)].completions[0].text.strip()) for a in columns.values()])
        console.print(table)
        channel.close()

        for p in PROMPTS:
            texts = [answers[(p, a)].completions[0].text for a in columns.values()]
            if len({texts[0], texts[1], texts[2]}) != 3:
                raise DemoFailed(f"for {p!r} the base and the LoRA and QLoRA adapters did not all answer differently")
            if texts[0] in (texts[3], texts[4]):
                raise DemoFailed(f"for {p!r} an extracted adapter answered as the base does")
            if texts[1] != texts[5]:
                raise DemoFailed("the prod alias did not serve the LoRA adapter it points at")
        console.print(f"[green]demo finished in {time.perf_counter() - started:.0f}s[/green]")
        return 0
    except (DemoFailed, JobDidNotSucceed) as exc:
        console.print(f"[red]demo failed:[/red] {escape(str(exc))}")
        return 1
    finally:
        codes = stack.stop()
        console.print(f"services stopped ({', '.join(f'{m} {c}' for m, c in codes.items())})")
