"""Registry value objects (plain data; the servicer turns them into protos)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class StoredFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class NewVersion:
    """Everything a publish commits in one metadata transaction."""

    name: str
    kind: str
    files: tuple[StoredFile, ...]
    lineage: dict
    labels: dict[str, str]
    description: str = ""
    lora_rank: int = 0
    lora_alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    project: str = "default"
    idempotency_key: str = ""
    module_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def content_sha256(self) -> str:
        return content_hash(self.files)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def base_model(self) -> str:
        return str(self.lineage.get("baseModel", ""))


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    kind: str
    files: tuple[StoredFile, ...]
    content_sha256: str
    size: int
    lineage: dict
    labels: dict[str, str]
    description: str
    lora_rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    aliases: tuple[str, ...]
    created_at: datetime
    project: str = "default"
    module_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str
    latest_version: int
    aliases: dict[str, int]
    base_model: str
    labels: dict[str, str]
    updated_at: datetime
    project: str = "default"


@dataclass(frozen=True)
class Event:
    id: int
    type: str  # published | alias_moved | alias_deleted | version_deleted
    name: str
    version: int
    alias: str
    content_sha256: str
    created_at: datetime


def content_hash(files) -> str:
    """sha256 over the sorted "path\\0sha256\\n" lines: identical trees hash alike."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{f.sha256}\n".encode())
    return digest.hexdigest()
