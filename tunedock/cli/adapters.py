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
