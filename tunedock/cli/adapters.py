"""`tunedock adapters`: artifacts in the registry (list, get, alias, download, publish)."""

from __future__ import annotations

from pathlib import Path

import typer
from google.protobuf import json_format
from rich.table import Table

from tunedock.cli.common import REGISTRY, cli_errors, console, print_json

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
    print_json(version) if as_json else show_version(version)


def show_version(v) -> None:
    """One version for people: what it is, where it came from, its metrics (an extraction's fidelity first)."""
    from tunedock import planner
    from tunedock.v1 import adapter_registry_pb2, common_pb2

    kind = adapter_registry_pb2.ArtifactKind.Name(v.kind).removeprefix("ARTIFACT_KIND_").lower()
    lines = [
        f"[bold]{v.name}:{v.version}[/bold]  {kind}  {planner.human(v.size)}  project {v.project}",
        f"created    {v.create_time.ToDatetime():%Y-%m-%d %H:%M:%S} UTC   sha256 {v.content_sha256[:16]}",
    ]
    if v.aliases:
        lines.append(f"aliases    {', '.join(sorted(v.aliases))}")
    lineage = v.lineage
    if lineage.base_model:
        lines.append(f"base       {lineage.base_model}")
    if lineage.method:
        lines.append(f"method     {common_pb2.Method.Name(lineage.method).removeprefix('METHOD_').lower()}")
    if lineage.extracted_from:
        lines.append(f"extracted  from {lineage.extracted_from}")
    if lineage.job_id:
        lines.append(f"job        {lineage.job_id}")
    if v.lora_rank:
        lines.append(f"lora       r={v.lora_rank} alpha={v.lora_alpha:g} modules {', '.join(v.target_modules)}")
    if v.labels:
        lines.append("labels     " + ", ".join(f"{label.key}={label.value}" for label in v.labels))
    for line in lines:
        console.print(line, highlight=False)
    metrics = {m.name: m.value for m in lineage.metrics}
    per_module = {k.split(".", 1)[1]: x for k, x in metrics.items() if k.startswith("retained_energy.")}
    if metrics:
        table = Table("metric", "value", title="metrics")
        for name, value in sorted(metrics.items()):
            if name.startswith("retained_energy."):
                continue
            table.add_row(name, f"{value:,.0f}" if value == int(value) and abs(value) >= 1000 else f"{value:.6g}")
        if per_module:
            worst = min(per_module, key=per_module.__getitem__)
            table.add_row(
                "retained energy per module",
                f"{len(per_module)} modules, mean {sum(per_module.values()) / len(per_module):.1%}, "
                f"lowest {per_module[worst]:.1%} ({worst}); all in --json",
            )
        console.print(table)


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
