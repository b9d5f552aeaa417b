"""Token files: the hashed bearer tokens services check, and the files both sides write (no grpc, no server).

A token file is JSON: `{"version": 1, "tokens": [{"name", "sha256", "roles", "projects", "kind"}]}`.
Only SHA-256 hashes are kept: tokens are 256-bit random strings, so a fast hash loses nothing and
a leaked file grants nothing. `tunedock tokens` and the local stack write these files; the
servers read them (services.common.auth). The worker-token key file lives here for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

from tunedock.errors import InvalidArgument

ROLES = frozenset(
    {
        "trainer.submit",  # upload datasets, submit and cancel jobs
        "trainer.read",  # list, get and watch jobs and datasets
        "trainer.worker",  # the worker API (worker tokens only, in practice)
        "registry.publish",  # publish versions
        "registry.read",  # list, get, resolve, download, watch
        "registry.admin",  # aliases and deletes
        "inference.generate",  # generate with the base model and readable adapters
        "inference.admin",  # load/unload/pin adapters, engine status
    }
)
ALL_PROJECTS = "*"
DEFAULT_PROJECT = "default"


def new_token(prefix: str = "td") -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_roles(roles: list[str]) -> frozenset[str]:
    expanded = set(ROLES) if "all" in roles else set(roles)
    unknown = sorted(expanded - ROLES)
    if unknown:
        raise InvalidArgument(f"unknown role(s) {unknown}; roles are {', '.join(sorted(ROLES))} (or all)")
    return frozenset(expanded)


def add_token(path: Path, name: str, roles: list[str], projects: list[str], kind: str = "user") -> str:
    """Create a token for `name` in the token file (created if missing); returns the token, shown once."""
    path = Path(path)
    data: dict = json.loads(path.read_text()) if path.exists() else {"version": 1, "tokens": []}
    if any(entry["name"] == name for entry in data["tokens"]):
        raise InvalidArgument(f"{path} already has a token named {name!r}; revoke it first")
    token = new_token()
    data["tokens"].append(
        {
            "name": name,
            "sha256": hash_token(token),
            "roles": sorted(check_roles(roles)),
            "projects": sorted(projects) or [DEFAULT_PROJECT],
            "kind": kind,
            "created_at": int(time.time()),
        }
    )
    _write_private(path, json.dumps(data, indent=2) + "\n")
    return token


def revoke_token(path: Path, name: str) -> bool:
    data = json.loads(Path(path).read_text())
    kept = [entry for entry in data["tokens"] if entry["name"] != name]
    if len(kept) == len(data["tokens"]):
        return False
    data["tokens"] = kept
    _write_private(Path(path), json.dumps(data, indent=2) + "\n")
    return True


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_key(path: Path) -> bytes:
    """The worker-token signing key shared by the trainer and the registry (created if missing)."""
    path = Path(path)
    if not path.exists():
        _write_private(path, secrets.token_hex(32) + "\n")
    key = path.read_text().strip()
    if len(key) < 32:
        raise InvalidArgument(f"worker key file {path} holds fewer than 32 characters")
    return key.encode()
