"""`tunedock tokens`: create, list and revoke bearer tokens in a token file (or a Secret's file).

The file keeps only SHA-256 hashes; a new token is printed once and cannot be shown again.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunedock.cli.common import cli_errors, console

tokens_app = typer.Typer(help="Bearer tokens: who may do what, in which projects.", no_args_is_help=True)
FILE = typer.Option(..., "--file", "-f", help="token file (JSON) the services read with --token-file")


@tokens_app.command("create")
@cli_errors
def create(
    name: str = typer.Argument(..., help="who the token is for (a person, a service, a CI job)"),
    role: list[str] = typer.Option(..., "--role", "-r", help="role (repeatable), or 'all'"),
    project: list[str] = typer.Option(["default"], "--project", "-p", help="project (repeatable), or '*' for all"),
    kind: str = typer.Option("user", help="user or service"),
    file: Path = FILE,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the token"),
):
    """Create a token; it is printed once (the file stores its hash)."""
    from tunedock.tokenfile import add_token

    token = add_token(file, name, role, project, kind)
    if quiet:
        print(token)
        return
    console.print(f"token for [bold]{name}[/bold] (shown once; store it now):")
    print(token)
    console.print(f"use it with: export TUNEDOCK_TOKEN={token[:6]}…  (or TUNEDOCK_TOKEN_FILE=<file with it>)")


@tokens_app.command("ls")
@cli_errors
def list_tokens(file: Path = FILE, as_json: bool = typer.Option(False, "--json")):
    """Names, roles and projects in a token file (never the tokens)."""
    entries = json.loads(file.read_text())["tokens"]
    if as_json:
        print(json.dumps([{k: e[k] for k in ("name", "roles", "projects", "kind")} for e in entries], indent=2))
        return
    for e in entries:
        console.print(
            f"{e['name']:<24} {e.get('kind', 'user'):<8} {','.join(e['projects']):<20} {' '.join(e['roles'])}"
        )


@tokens_app.command("revoke")
@cli_errors
def revoke(name: str, file: Path = FILE):
    """Remove a token; services stop accepting it within seconds (the file is re-read)."""
    from tunedock.tokenfile import revoke_token

    if not revoke_token(file, name):
        raise ValueError(f"{file} has no token named {name!r}")
    console.print(f"revoked {name}")
