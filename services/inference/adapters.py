"""Adapter resolution and the local adapter cache (no vLLM here).

- `AdapterResolver`: ref -> (name, version, content hash) through the registry. A resolution is
  fresh for `ttl_s`; after that the last known answer is served at once while one background
  refresh asks the registry again (so a registry outage costs cached adapters nothing). A
  registry Watch drops a name's resolutions the moment an alias moves, and a resolve that was in
  flight across that moment is not cached (it may hold the old answer). An adapter never seen
  while the registry is down fails UNAVAILABLE within a couple of seconds.
- `AdapterCache`: files on local disk keyed by content hash (one download per hash even under
  concurrent first requests: one lock per key), checked against the served base before the
  engine sees them: recorded base fingerprint, rank, hot-swappable modules, and the shape of
  every module (from the registry's record before download, from the files after), bounded in
  bytes with LRU eviction that never evicts an adapter in use or pinned.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.lora_shapes import SERVABLE_MODULES, adapter_module_shapes, mismatches
from services.common.registry_answers import registry_answer
from tunedock.client import RegistryClient
from tunedock.client.registry import ChecksumMismatch
from tunedock.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TuneDockError,
    Unavailable,
)
from tunedock.model_files import read_header
from tunedock.v1 import adapter_registry_pb2 as rpb

log = logging.getLogger(__name__)

COLD_RESOLVE_TIMEOUT_S = 2.0


class LoraIds:
    """Engine ids of adapter contents: one id per content hash, never two contents on one id.

    vLLM takes `lora_int_id` as an adapter's identity (its slots and CPU LRU are keyed by it), so
    two contents on one id would serve one's weights for the other, silently. The id is the hash
    folded into `space` (the same on every replica in the common case); a fold that lands on an id
    another content holds probes to the next free one. Ids are never reused within a process: the
    engine may still hold an evicted adapter under its old id. One entry per content ever served.
    """

    def __init__(self, space: int = 2**31 - 2) -> None:
        self.space = space
        """Ids are 1..space (vLLM's ids are positive int32; the engine's zero adapter sits above)."""
        self._by_content: dict[str, int] = {}
        self._taken: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, content_sha256: str) -> int:
        with self._lock:
            known = self._by_content.get(content_sha256)
            if known is not None:
                return known
            if len(self._taken) >= self.space:
                raise ResourceExhausted(f"all {self.space} adapter ids of this replica are taken; restart it")
            candidate = int(content_sha256[:15], 16) % self.space
            while candidate + 1 in self._taken:
                candidate = (candidate + 1) % self.space
            self._by_content[content_sha256] = candidate + 1
            self._taken.add(candidate + 1)
            return candidate + 1


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


def _about(exc: TuneDockError, ref: str) -> TuneDockError:
    """The registry's answer, said about this adapter reference."""
    return registry_answer(
        exc, f"adapter {ref!r}", "inference", unavailable="cached adapters keep serving, retry later"
    )


def _name_of(ref: str) -> str:
    return ref.split("@")[0].split(":")[0]


class AdapterResolver:
    def __init__(self, registry: RegistryClient, ttl_s: float = 10.0) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, ResolvedAdapter]] = {}
        self._generation: dict[str, int] = {}  # per name: bumped by every invalidation
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()
        self._refresher = ThreadPoolExecutor(2, thread_name_prefix="resolve-refresh")

    def resolve(self, ref: str) -> ResolvedAdapter:
        return self.cached(ref) or self._ask(ref, timeout=COLD_RESOLVE_TIMEOUT_S)

    def cached(self, ref: str) -> ResolvedAdapter | None:
        """The known resolution without waiting on anything (a stale one starts a background refresh)."""
        with self._lock:
            hit = self._cache.get(ref)
        if hit is None:
            return None
        if time.monotonic() - hit[0] >= self.ttl_s:
            self._refresh_later(ref)
        return hit[1]

    def _ask(self, ref: str, timeout: float) -> ResolvedAdapter:
        name = _name_of(ref)
        with self._lock:
            generation = self._generation.get(name, 0)
        try:
            reply = self.registry.stub.Resolve(rpb.ResolveRequest(ref=ref), timeout=timeout)
        except TuneDockError as exc:
            raise _about(exc, ref) from None
        if reply.kind != rpb.ARTIFACT_KIND_LORA_ADAPTER:
            raise FailedPrecondition(f"{ref!r} is not a LoRA adapter; only lora_adapter artifacts can be hot-swapped")
        resolved = ResolvedAdapter(reply.name, reply.version, reply.content_sha256, reply.project or "default")
        with self._lock:
            if self._generation.get(name, 0) == generation:  # no alias moved while we asked
                self._cache[ref] = (time.monotonic(), resolved)
        return resolved

    def _refresh_later(self, ref: str) -> None:
        with self._lock:
            if ref in self._refreshing:
                return
            self._refreshing.add(ref)

        def refresh() -> None:
            try:
                self._ask(ref, timeout=30)
            except (Unavailable, NotFound, InvalidArgument, FailedPrecondition) as exc:
                if not isinstance(exc, Unavailable):  # gone or changed kind: stop serving it
                    with self._lock:
                        self._cache.pop(ref, None)
            finally:
                with self._lock:
                    self._refreshing.discard(ref)

        self._refresher.submit(refresh)

    def invalidate(self, name: str) -> None:
        """Forget every cached resolution of `name` (an alias moved or a version went away)."""
        with self._lock:
            self._generation[name] = self._generation.get(name, 0) + 1
            for ref in [r for r in self._cache if _name_of(r) == name]:
                del self._cache[ref]

    def follow(
        self,
        stop: threading.Event,
        on_event: Callable[[Any], None] | None = None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        """Invalidate on registry events until `stop`; reconnects after registry outages, resuming by event id.

        `on_event` sees each event after its name's resolutions were dropped (warm-on-promote uses it).
        Anything else that goes wrong is logged with its traceback and counted (`on_error`), and the
        watch carries on after the event that failed: a dead watch would serve moved aliases forever."""
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
                    if on_event is not None:
                        on_event(event)
            except TuneDockError:
                stop.wait(0.2)
            except Exception:
                log.exception("the registry watch failed after event %d; reconnecting", last)
                on_error()
                stop.wait(1.0)

    def close(self) -> None:
        self._refresher.shutdown(wait=False, cancel_futures=True)


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
        base_shapes: dict[str, list[int]],
        metrics=None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".removed-*"):  # a removal a previous process did not finish
            shutil.rmtree(leftover, ignore_errors=True)
        self.registry = registry
        self.max_bytes = max_bytes
        self.max_lora_rank = max_lora_rank
        self.base_fingerprint = base_fingerprint
        self.base_model = base_model
        self.base_shapes = base_shapes
        self.metrics = metrics
        self.entries: OrderedDict[str, CachedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._verdicts: dict[str, str] = {}  # "name:version" -> "" (compatible) or why not; versions are immutable

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def acquire_cached(self, resolved: ResolvedAdapter, pin: bool = False) -> CachedAdapter | None:
        """The adapter if it is on disk and checked already, marked in use; None otherwise (no I/O here)."""
        if self._verdicts.get(resolved.ref):
            raise FailedPrecondition(self._verdicts[resolved.ref])
        with self._lock:
            entry = self.entries.get(resolved.content_sha256)
            if entry is None or resolved.ref not in self._verdicts:
                return None
            self.entries.move_to_end(resolved.content_sha256)
            entry.in_flight += 1
            entry.pinned = entry.pinned or pin
            entry.last_used = time.time()
        self._count("hits")
        return entry

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
            self.evict()
            return entry

    def release(self, entry: CachedAdapter, evict: bool = True) -> bool:
        """Done with `entry`; returns whether the cache is over its bound (evicted here when `evict`).

        Eviction deletes files: an event loop passes evict=False and runs `evict` in a thread.
        """
        with self._lock:
            entry.in_flight -= 1
            over = sum(e.size for e in self.entries.values()) > self.max_bytes
        if over and evict:
            self.evict()
        return over

    def _fetch(self, resolved: ResolvedAdapter, existing: CachedAdapter | None) -> CachedAdapter:
        target = self.root / resolved.content_sha256
        try:
            version = self.registry.get(resolved.ref)
            self._judge(resolved, lambda: self._check_recorded(resolved, version))
            if existing is None and not (target / "adapter_config.json").exists():
                started = time.perf_counter()
                self.registry.download(resolved.ref, target)
                if self.metrics:
                    self.metrics.adapter_download.observe(time.perf_counter() - started)
        except ChecksumMismatch as exc:
            if existing is None:
                shutil.rmtree(target, ignore_errors=True)
            raise FailedPrecondition(f"adapter {resolved.ref} is corrupt: {exc}") from None
        except TuneDockError as exc:
            # Another version with these bytes may be serving from `target` (same content, other
            # metadata, e.g. a copy recorded for another base): its files are not this refusal's to delete.
            if existing is None:
                shutil.rmtree(target, ignore_errors=True)
            raise _about(exc, resolved.ref) from None
        try:
            rank = self._judge(resolved, lambda: self._check_files(resolved, target))
        except FailedPrecondition:
            if existing is None:
                shutil.rmtree(target, ignore_errors=True)
            raise
        self._verdicts[resolved.ref] = ""
        if existing is not None:
            return existing
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        return CachedAdapter(resolved, target, size, rank)

    def _judge(self, resolved: ResolvedAdapter, check):
        """Run a check; remember a refusal for this (immutable) version."""
        try:
            return check()
        except FailedPrecondition as exc:
            self._verdicts[resolved.ref] = exc.message
            raise

    def _check_recorded(self, resolved: ResolvedAdapter, version: rpb.ArtifactVersion) -> None:
        """What the registry recorded, before a byte is downloaded."""
        fingerprint = version.lineage.base_fingerprint
        if fingerprint and self.base_fingerprint and fingerprint != self.base_fingerprint:
            raise FailedPrecondition(
                f"adapter {resolved.ref} was trained on base {version.lineage.base_model or 'unknown'!r}, which is "
                f"not the base this replica serves ({self.base_model}); serve it on its own base"
            )
        unsupported = sorted(set(version.target_modules) - SERVABLE_MODULES)
        if unsupported:
            raise FailedPrecondition(
                f"adapter {resolved.ref} adapts {unsupported}, which vLLM cannot hot-swap; "
                "merge it into the base instead"
            )
        if version.lora_rank > self.max_lora_rank:
            raise FailedPrecondition(
                f"adapter {resolved.ref} has rank {version.lora_rank}, above this replica's max_lora_rank "
                f"{self.max_lora_rank}"
            )
        recorded = {m.module: [m.in_features, m.out_features] for m in version.module_shapes}
        self._check_shapes(resolved, recorded)

    def _check_files(self, resolved: ResolvedAdapter, path: Path) -> int:
        """What the downloaded files say (authoritative; versions published before shapes were recorded too)."""
        config = json.loads((path / "adapter_config.json").read_text())
        rank = max([int(config.get("r", 0)), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])
        if rank > self.max_lora_rank:
            raise FailedPrecondition(
                f"adapter {resolved.ref} has rank {rank}, above this replica's max_lora_rank {self.max_lora_rank}"
            )
        if config.get("modules_to_save"):
            raise FailedPrecondition(
                f"adapter {resolved.ref} adapts {config['modules_to_save']}, which vLLM cannot hot-swap; "
                "merge it into the base instead"
            )
        self._check_shapes(resolved, adapter_module_shapes(read_header(path / "adapter_model.safetensors")))
        return rank

    def _check_shapes(self, resolved: ResolvedAdapter, shapes: dict[str, list[int]]) -> None:
        if not self.base_shapes or not shapes:
            return
        problems = mismatches(shapes, self.base_shapes)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise FailedPrecondition(
                f"adapter {resolved.ref} was made for a base of another shape: {problems[0]}{more}; "
                f"this replica serves {self.base_model}"
            )

    def drop(self, content_sha256: str) -> CachedAdapter | None:
        """Forget an adapter (unpin, delete its files) unless a request is using it."""
        with self._lock:
            entry = self.entries.get(content_sha256)
            if entry is None:
                return None
            if entry.in_flight:
                raise FailedPrecondition(f"adapter {entry.resolved.ref} serves {entry.in_flight} request(s) now")
            del self.entries[content_sha256]
        self._remove_files(entry)
        return entry

    def evict(self) -> list[CachedAdapter]:
        """Drop least recently used adapters (neither in use nor pinned) until within the bound; blocks on disk."""
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
            self._remove_files(entry)
            self._count("evictions")
        return evicted

    def _remove_files(self, entry: CachedAdapter) -> None:
        """Delete a forgotten adapter's files, never under a re-download of the same content.

        The directory is renamed aside under its key's lock (which `acquire` holds while it fetches),
        unless the content was acquired again meanwhile; the slow part, deleting, runs after.
        """
        key = entry.resolved.content_sha256
        with self._key_lock(key):
            with self._lock:
                if key in self.entries:
                    return  # acquired again since it was forgotten: these files serve it
            trash = entry.path.with_name(f".removed-{key}-{uuid.uuid4().hex[:8]}")
            try:
                entry.path.rename(trash)
            except FileNotFoundError:
                return
        shutil.rmtree(trash, ignore_errors=True)

    def _count(self, what: str) -> None:
        if self.metrics:
            self.metrics.cache_events.labels(what).inc()
