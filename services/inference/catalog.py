"""What `GET /v1/models` lists: the base, and every adapter version and alias made for it.

Read from the registry with the service's own token, then narrowed to the caller's projects
(an adapter the caller may not read is not listed, exactly as it is not served). Listed are
adapters whose lineage names this replica's base (by fingerprint, where both are known): the
ones a request could actually be served with. The listing is cached (clients such as Open WebUI
poll it) until the registry's Watch reports a change, or for `ttl_s` at most.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from services.common.auth import Principal
from tunedock.v1 import adapter_registry_pb2 as rpb
from tunedock.v1 import common_pb2

METHOD_NAMES = {
    common_pb2.METHOD_FULL: "full",
    common_pb2.METHOD_FREEZE: "freeze",
    common_pb2.METHOD_LORA: "lora",
    common_pb2.METHOD_QLORA: "qlora",
}


@dataclass(frozen=True)
class ModelCard:
    id: str
    """What a request sends as `model`: the base's id, "name" (latest), "name:3" or "name@alias"."""
    created: int
    owned_by: str
    """The project (tenant) the adapter belongs to; "tunedock" for the base."""
    parent: str | None
    """The base's id for an adapter, None for the base."""
    name: str = ""
    version: int = 0
    method: str = ""
    """How it was trained: full, freeze (through their extracted adapters), lora, qlora."""
    aliases: tuple[str, ...] = ()
    project: str = ""

    def to_openai(self) -> dict:
        card: dict = {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}
        card["parent"] = self.parent
        card["root"] = self.parent or self.id
        if self.name:
            card["tunedock"] = {
                "name": self.name,
                "version": self.version,
                "method": self.method,
                "aliases": list(self.aliases),
                "project": self.project,
            }
        return card


@dataclass
class ModelCatalog:
    registry: object
    """A RegistryClient (the service's token: it reads every project; callers are filtered here)."""
    base_id: str
    base_fingerprint: str
    started: int = field(default_factory=lambda: int(time.time()))
    ttl_s: float = 30.0
    _cached: tuple[float, list[ModelCard]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def base_card(self) -> ModelCard:
        return ModelCard(self.base_id, self.started, "tunedock", None)

    def adapters(self) -> list[ModelCard]:
        """Every servable adapter ref (blocking: registry calls; run it in a thread)."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl_s:
                return self._cached[1]
            cards = self._read()
            self._cached = (time.monotonic(), cards)
            return cards

    def _read(self) -> list[ModelCard]:
        cards: list[ModelCard] = []
        for artifact in self.registry.list_artifacts(kind="lora_adapter"):  # type: ignore[attr-defined]
            versions = [v for v in self.registry.list_versions(artifact.name) if self._for_this_base(v)]  # type: ignore[attr-defined]
            if not versions:
                continue
            by_number = {v.version: v for v in versions}
            for v in versions:
                cards.append(self._card(f"{v.name}:{v.version}", v))
            latest = by_number.get(artifact.latest_version)
            if latest is not None:
                cards.append(self._card(artifact.name, latest))
            for alias, number in sorted(artifact.aliases.items()):
                if number in by_number:
                    cards.append(self._card(f"{artifact.name}@{alias}", by_number[number]))
        return cards

    def _for_this_base(self, version: rpb.ArtifactVersion) -> bool:
        fingerprint = version.lineage.base_fingerprint
        return not (fingerprint and self.base_fingerprint) or fingerprint == self.base_fingerprint

    def _card(self, ref: str, v: rpb.ArtifactVersion) -> ModelCard:
        return ModelCard(
            id=ref,
            created=int(v.create_time.seconds),
            owned_by=v.project,
            parent=self.base_id,
            name=v.name,
            version=v.version,
            method=METHOD_NAMES.get(v.lineage.method, ""),
            aliases=tuple(v.aliases),
            project=v.project,
        )

    def visible(self, caller: Principal) -> list[ModelCard]:
        return [self.base_card(), *(c for c in self.adapters() if caller.may_access(c.project))]

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None
