"""Who is calling: bearer tokens, principals with roles and projects, job-scoped worker tokens.

No grpc here (the interceptor in `services.common.interceptors` reads the metadata and
sets `current_principal`); cores ask the principal what the caller may see and do.

- User and service tokens live in a JSON file (or a Kubernetes Secret mounted as one),
  stored as SHA-256 hashes: tokens are 256-bit random strings, so a fast hash loses
  nothing and a leaked file grants nothing. The file is re-read when it changes.
- Worker tokens are minted by the trainer per attempt: HMAC-signed, expiring, naming
  one job, its project and the registry names its output may be published under. The
  trainer and the registry share the key; nothing is stored.
- With no token file at all, authentication is off: every call is the `ANONYMOUS`
  principal (all roles, all projects), and servers only bind loopback (settings).
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunedock.errors import InvalidArgument, PermissionDenied
from tunedock.tokenfile import ALL_PROJECTS, DEFAULT_PROJECT, ROLES, check_roles, hash_token

WORKER_TOKEN_PREFIX = "tdw."


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    roles: frozenset[str]
    projects: frozenset[str]
    """Projects whose items it may see and use; "*" means all."""
    kind: str = "user"
    """user | service | worker | anonymous."""
    job_id: str = ""
    """Worker tokens: the one job they act for."""
    publish_names: tuple[str, ...] = ()
    """Worker tokens: the registry names the job's outputs may be published under."""

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def may_access(self, project: str) -> bool:
        return ALL_PROJECTS in self.projects or project in self.projects

    @property
    def default_project(self) -> str:
        named = sorted(p for p in self.projects if p != ALL_PROJECTS)
        return named[0] if named else DEFAULT_PROJECT

    def project_for_write(self, requested: str) -> str:
        """The project a new item goes into: the one asked for, else the caller's default."""
        project = requested or self.default_project
        if not self.may_access(project):
            raise PermissionDenied(f"{self.name} may not use project {project!r}")
        return project

    def readable_projects(self, requested: str = "") -> set[str] | None:
        """What a list may show: the caller's projects, narrowed to `requested`; None means every project.

        A requested project the caller may not see lists as empty, like one without items.
        """
        if requested:
            return {requested} if self.may_access(requested) else set()
        return None if ALL_PROJECTS in self.projects else set(self.projects)

    def check_job(self, job_id: str) -> None:
        if self.job_id and self.job_id != job_id:
            raise PermissionDenied(f"this worker token is for job {self.job_id}, not {job_id}")

    def check_publish_name(self, name: str) -> None:
        if self.kind == "worker" and name not in self.publish_names:
            raise PermissionDenied(
                f"this worker token may publish only {', '.join(self.publish_names) or 'nothing'}, not {name!r}"
            )


ANONYMOUS = Principal("anonymous", ROLES, frozenset({ALL_PROJECTS}), kind="anonymous")
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def principal() -> Principal:
    """The caller of the RPC being served (ANONYMOUS where authentication is off)."""
    return current_principal.get()


@dataclass
class TokenFile:
    """Hashed tokens from a JSON file, re-read when its modification time changes."""

    path: Path
    recheck_s: float = 2.0
    _by_hash: dict[str, Principal] = field(default_factory=dict)
    _mtime: float = -1.0
    _checked: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._reload()  # a broken file fails at start-up, not on the first call

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
            data = json.loads(self.path.read_text())
            entries = data["tokens"]
            by_hash = {
                entry["sha256"]: Principal(
                    name=entry["name"],
                    roles=check_roles(entry.get("roles", [])),
                    projects=frozenset(entry.get("projects") or [DEFAULT_PROJECT]),
                    kind=entry.get("kind", "user"),
                )
                for entry in entries
            }
        except (OSError, ValueError, KeyError, TypeError, InvalidArgument) as exc:
            if self._mtime < 0:
                raise InvalidArgument(f"token file {self.path}: {exc}") from None
            return  # keep the last good set while the file is being rewritten
        self._by_hash, self._mtime = by_hash, mtime

    def lookup(self, token: str) -> Principal | None:
        now = time.monotonic()
        if now - self._checked > self.recheck_s:
            with self._lock:
                self._checked = now
                try:
                    changed = self.path.stat().st_mtime != self._mtime
                except OSError:
                    changed = False
                if changed:
                    self._reload()
        return self._by_hash.get(hash_token(token))


# ---------------------------------------------------------------------------- worker tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class WorkerTokens:
    """Mint and verify job-scoped worker tokens (HMAC-SHA256 over a small JSON payload)."""

    key: bytes

    def issue(self, job_id: str, attempt: int, project: str, publish_names: tuple[str, ...], ttl_s: float) -> str:
        payload = {
            "job": job_id,
            "attempt": attempt,
            "project": project,
            "publish": list(publish_names),
            "exp": int(time.time() + ttl_s),
        }
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{WORKER_TOKEN_PREFIX}{body}.{self._sign(body)}"

    def verify(self, token: str) -> Principal | None:
        if not token.startswith(WORKER_TOKEN_PREFIX):
            return None
        body, _, signature = token.removeprefix(WORKER_TOKEN_PREFIX).partition(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            payload = json.loads(_unb64(body))
            if payload["exp"] < time.time():
                return None
            return Principal(
                name=f"worker:{payload['job']}",
                roles=frozenset({"trainer.worker", "registry.read", "registry.publish"}),
                projects=frozenset({str(payload["project"])}),
                kind="worker",
                job_id=str(payload["job"]),
                publish_names=tuple(map(str, payload["publish"])),
            )
        except (ValueError, KeyError, TypeError):  # signed but not a payload this code wrote
            return None

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.key, body.encode(), hashlib.sha256).digest())


@dataclass
class Authenticator:
    """Token -> principal, from the token file and (where configured) worker tokens."""

    tokens: TokenFile
    workers: WorkerTokens | None = None

    def authenticate(self, token: str) -> Principal | None:
        if self.workers is not None and token.startswith(WORKER_TOKEN_PREFIX):
            return self.workers.verify(token)
        return self.tokens.lookup(token)


def method_roles(service, roles: dict[str, str | None]) -> dict[str, str | None]:
    """Full method names of a proto service -> roles; every RPC must be named (a new RPC is never left open).

    A role of None means any authenticated caller (what a server serves, for instance)."""
    missing = sorted(set(service.methods_by_name) - set(roles))
    if missing:
        raise ValueError(f"no role given for {service.full_name} RPCs {missing}")
    unknown = sorted({r for r in roles.values() if r is not None} - ROLES)
    if unknown:
        raise ValueError(f"unknown roles {unknown}")
    return {f"/{service.full_name}/{rpc}": roles[rpc] for rpc in service.methods_by_name}
