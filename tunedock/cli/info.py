"""`tunedock info`: what each service serves and accepts (GetTrainerInfo, GetRegistryInfo, GetInferenceInfo)."""

from __future__ import annotations

import typer
from rich.markup import escape

from tunedock.cli.common import INFERENCE, REGISTRY, TRAINER, _console, cli_errors, print_json


def _size(n: int) -> str:
    return f"{n / 2**30:.0f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@cli_errors
def info(
    trainer: str = typer.Option(TRAINER),
    registry: str = typer.Option(REGISTRY),
    inference: str = typer.Option(INFERENCE),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What the stack serves: the base model and its limits, the trainer's default base, the registry's storage.

    Any valid token may ask. A service that does not answer is reported and the others still shown.
    """
    from google.protobuf.json_format import MessageToDict

    from tunedock.client import InferenceClient, RegistryClient, TrainerClient
    from tunedock.errors import TuneDockError

    answers: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for name, client_class, address in (
        ("inference", InferenceClient, inference),
        ("trainer", TrainerClient, trainer),
        ("registry", RegistryClient, registry),
    ):
        try:
            with client_class(address, timeout=10) as client:
                answers[name] = MessageToDict(client.info(), preserving_proto_field_name=True)
        except TuneDockError as exc:
            errors[name] = f"{address}: {exc.message}"
    if as_json:
        print_json({**answers, "errors": errors})
    else:
        _print(answers, errors)
    if errors and not answers:
        raise typer.Exit(2)


def _print(answers: dict[str, dict], errors: dict[str, str]) -> None:
    console = _console()
    rows: dict[str, list[tuple[str, str]]] = {}
    if (i := answers.get("inference")) is not None:
        rows["inference"] = [
            ("base model", f"{i.get('base_model', '')} ({i.get('architecture', '?')}, {i.get('dtype', '')})"),
            ("base fingerprint", i.get("base_fingerprint", "")[:16] + "..."),
            ("chat template", "yes: send messages" if i.get("has_chat_template") else "none: send prompt"),
            (
                "LoRA",
                f"{i.get('max_loras', 0)} per batch, {i.get('max_cpu_loras', 0)} in host memory, "
                f"rank <= {i.get('max_lora_rank', 0)}",
            ),
            ("isolation", i.get("isolation_mode", "")),
            (
                "limits",
                f"max_model_len {i.get('max_model_len', 0)}, max_tokens <= {i.get('max_tokens_limit', 0)}, "
                f"prompt <= {int(i.get('max_prompt_chars', 0)):,} chars",
            ),
            ("device", i.get("device", "")),
            ("routing key", i.get("routing_key", "")),
            ("tool-call parser", i.get("tool_parser", "") or "none (tool_choice auto returns text)"),
            ("OpenAI API", i.get("openai_base_url", "") or "not served (--http-port)"),
        ]
    if (t := answers.get("trainer")) is not None:
        gpus = f" x{t.get('gpu_count', 0)}" if t.get("gpu_count") else ""
        rows["trainer"] = [
            ("default base", t.get("default_base_model", "")),
            ("bases from", ", ".join(t.get("base_model_sources", []))),
            ("methods", ", ".join(t.get("methods", []))),
            ("data formats", ", ".join(t.get("dataset_formats", []))),
            (
                "executor",
                f"{t.get('executor', '')} ({t.get('device', '')}{gpus})"
                + (", several nodes per job" if t.get("multi_node") else ""),
            ),
            (
                "limits",
                f"{t.get('max_concurrent_jobs', 0)} jobs at once, {t.get('max_attempts', 0)} attempts, "
                f"datasets <= {_size(int(t.get('max_dataset_bytes', 0)))}",
            ),
        ]
    if (r := answers.get("registry")) is not None:
        rows["registry"] = [
            ("storage", f"{r.get('metadata_backend', '')} + {r.get('blob_backend', '')} blobs"),
            ("kinds", ", ".join(r.get("artifact_kinds", []))),
            ("limits", f"artifacts <= {_size(int(r.get('max_artifact_bytes', 0)))}, {r.get('max_files', 0)} files"),
        ]
    for service, lines in rows.items():
        version = answers[service].get("version", "")
        console.print(f"[bold]{service}[/bold] {version}")
        for key, value in lines:
            console.print(f"  {key:<17} {escape(str(value))}", highlight=False, soft_wrap=True)
    for service, message in errors.items():
        console.print(f"[bold]{service}[/bold] [red]not reachable[/red]: {escape(message)}", highlight=False)
