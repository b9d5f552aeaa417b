"""Adapter resolution and the local adapter cache (no vLLM here).

- `AdapterResolver`: ref -> (name, version, content hash) through the registry, with a
  short TTL cache that a registry Watch invalidates when aliases move. If the registry is
  down, the last known resolution keeps serving; an adapter never seen fails UNAVAILABLE.
- `AdapterCache`: files on local disk keyed by content hash (one download per hash even
  under concurrent first requests: one lock per key), checked for compatibility with the
  served base before the engine sees them, bounded in bytes with LRU eviction that never
  evicts an adapter in use or pinned.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tunedock.client import RegistryClient
from tunedock.client.registry import ChecksumMismatch
from tunedock.v1 import adapter_registry_pb2 as rpb

log = logging.getLogger(__name__)

# Modules vLLM's LoRA layers serve on Llama-style models (lm_head/embeddings are not hot-swappable).
SERVABLE_MODULES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
}


def lora_int_id(content_sha256: str) -> int:
    """Stable engine id from the content hash (same adapter bytes, same id, on every replica)."""
    return int(content_sha256[:15], 16) % (2**31 - 2) + 1


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    version: int
    content_sha256: str
    project: str = "default"

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass
class CachedAdapter:
    resolved: ResolvedAdapter
    path: Path
    size: int
    rank: int
    pinned: bool = False
    in_flight: int = 0
    last_used: float = field(default_factory=time.time)
    loaded: bool = False


def _translate(exc: grpc.RpcError, ref: str) -> Exception:
    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"adapter {ref!r}: {exc.details()}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"adapter {ref!r}: {exc.details()}")
    return Unavailable(
        f"adapter registry unavailable ({code.name}): cannot resolve {ref!r}; cached adapters keep serving, retry later"
    )


class AdapterResolver:
    def __init__(self, registry: RegistryClient, ttl_s: float = 10.0) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, ResolvedAdapter]] = {}
        self._lock = threading.Lock()

    def resolve(self, ref: str) -> ResolvedAdapter:
        with self._lock:
            hit = self._cache.get(ref)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        try:
            reply = self.registry.resolve(ref)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and hit:
                return hit[1]  # registry down: the last known answer keeps serving
            raise _translate(exc, ref) from None
        if reply.kind != rpb.ARTIFACT_KIND_LORA_ADAPTER:
            raise FailedPrecondition(f"{ref!r} is not a LoRA adapter; only lora_adapter artifacts can be hot-swapped")
        resolved = ResolvedAdapter(reply.name, reply.version, reply.content_sha256, reply.project or "default")
        with self._lock:
            self._cache[ref] = (time.monotonic(), resolved)
        return resolved

    def invalidate(self, name: str) -> None:
        """Forget every cached resolution of `name` (an alias moved or a version went away)."""
        with self._lock:
            for ref in [r for r in self._cache if r.split("@")[0].split(":")[0] == name]:
                del self._cache[ref]

    def follow(self, stop: threading.Event) -> None:
        """Invalidate on registry events until `stop`; reconnects after registry outages, resuming by event id."""
        current: list = [None]

        def cancel_on_stop() -> None:
            stop.wait()
            if current[0] is not None:
                current[0].cancel()

        threading.Thread(target=cancel_on_stop, daemon=True, name="registry-watch-stop").start()
        last = 0
        while not stop.is_set():
            try:
                current[0] = self.registry.watch(after_event_id=last)
                for event in current[0]:
                    last = event.event_id
                    self.invalidate(event.name)  # publish moves latest; other events move or remove refs
            except grpc.RpcError:
                stop.wait(1.0)


class AdapterCache:
    """Adapter directories under `root/<content_sha256>`, bounded to `max_bytes`."""

    def __init__(
        self,
        root: Path,
        registry: RegistryClient,
        max_bytes: int,
        max_lora_rank: int,
        base_fingerprint: str,
        base_model: str,
        metrics=None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.max_bytes = max_bytes
        self.max_lora_rank = max_lora_rank
        self.base_fingerprint = base_fingerprint
        self.base_model = base_model
        self.metrics = metrics
        self.entries: OrderedDict[str, CachedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._verdicts: dict[str, str] = {}  # "name:version" -> "" (compatible) or why not; versions are immutable

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def acquire(self, resolved: ResolvedAdapter, pin: bool = False) -> CachedAdapter:
        """The adapter on local disk, checked, marked in use (call `release` when done)."""
        key = resolved.content_sha256
        if self._verdicts.get(resolved.ref):
            raise FailedPrecondition(self._verdicts[resolved.ref])
        with self._key_lock(key):
            with self._lock:
                entry = self.entries.get(key)
                if entry is not None and resolved.ref not in self._verdicts:
                    entry = None  # same bytes, but this version's metadata (its base) is not checked yet
                if entry is not None:
                    self.entries.move_to_end(key)
                    entry.in_flight += 1
                    entry.pinned = entry.pinned or pin
                    entry.last_used = time.time()
                    self._count("hits")
                    return entry
            self._count("misses")
            with self._lock:
                existing = self.entries.get(key)
            entry = self._fetch(resolved, existing)
            with self._lock:
                entry.in_flight += 1
                entry.pinned = entry.pinned or pin
                self.entries[key] = entry
            self._evict()
            return entry

    def release(self, entry: CachedAdapter) -> None:
        with self._lock:
            entry.in_flight -= 1
        self._evict()

    def _fetch(self, resolved: ResolvedAdapter, existing: CachedAdapter | None) -> CachedAdapter:
        target = self.root / resolved.content_sha256
        try:
            if existing is None and not (target / "adapter_config.json").exists():
                started = time.perf_counter()
                version = self.registry.download(resolved.ref, target)
                if self.metrics:
                    self.metrics.adapter_download.observe(time.perf_counter() - started)
            else:
                version = self.registry.get(resolved.ref)
        except ChecksumMismatch as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise FailedPrecondition(f"adapter {resolved.ref} is corrupt: {exc}") from None
        except grpc.RpcError as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise _translate(exc, resolved.ref) from None
        try:
            rank = self._check_compatible(resolved, version, target)
        except FailedPrecondition as exc:
            self._verdicts[resolved.ref] = exc.message
            if existing is None:
                shutil.rmtree(target, ignore_errors=True)
            raise
        self._verdicts[resolved.ref] = ""
        if existing is not None:
            return existing
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        return CachedAdapter(resolved, target, size, rank)

    def _check_compatible(self, resolved: ResolvedAdapter, version: rpb.ArtifactVersion, path: Path) -> int:
        fingerprint = version.lineage.base_fingerprint
        if fingerprint and self.base_fingerprint and fingerprint != self.base_fingerprint:
            raise FailedPrecondition(
                f"adapter {resolved.ref} was trained on base {version.lineage.base_model or 'unknown'!r}, which is "
                f"not the base this replica serves ({self.base_model}); serve it on its own base"
            )
        config = json.loads((path / "adapter_config.json").read_text())
        rank = max([int(config.get("r", 0)), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])
        if rank > self.max_lora_rank:
            raise FailedPrecondition(
                f"adapter {resolved.ref} has rank {rank}, above this replica's max_lora_rank {self.max_lora_rank}"
            )
        unsupported = sorted(set(version.target_modules) - SERVABLE_MODULES)
        if unsupported or config.get("modules_to_save"):
            what = unsupported or config.get("modules_to_save")
            raise FailedPrecondition(
                f"adapter {resolved.ref} adapts {what}, which vLLM cannot hot-swap; merge it into the base instead"
            )
        return rank

    def drop(self, content_sha256: str) -> CachedAdapter | None:
        """Forget an adapter (unpin, delete its files) unless a request is using it."""
        with self._lock:
            entry = self.entries.get(content_sha256)
            if entry is None:
                return None
            if entry.in_flight:
                raise FailedPrecondition(f"adapter {entry.resolved.ref} serves {entry.in_flight} request(s) now")
            del self.entries[content_sha256]
        shutil.rmtree(entry.path, ignore_errors=True)
        return entry

    def _evict(self) -> list[CachedAdapter]:
        evicted = []
        with self._lock:
            total = sum(e.size for e in self.entries.values())
            for key, entry in list(self.entries.items()):  # least recently used first
                if total <= self.max_bytes:
                    break
                if entry.in_flight or entry.pinned:
                    continue
                del self.entries[key]
                total -= entry.size
                evicted.append(entry)
        for entry in evicted:
            shutil.rmtree(entry.path, ignore_errors=True)
            self._count("evictions")
        return evicted

    def _count(self, what: str) -> None:
        if self.metrics:
            self.metrics.cache_events.labels(what).inc()
