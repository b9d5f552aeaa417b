"""The registry core: publish sessions, resolve, download, aliases, deletes, events.

Publish is atomic by construction:
1. the manifest is checked before any byte is accepted;
2. chunks stream into a private staging directory, hashed as they arrive;
3. when every file is complete and its sha256 matches, the contents are validated;
4. blobs move into the content-addressed store; then ONE metadata transaction makes the
   version visible. A failure anywhere before step 4's commit removes the staging
   directory and any blob this publish added that nothing references; `collect_garbage`
   at start-up sweeps what a crash left behind.
Every artifact belongs to a project. The caller (`services.common.auth.principal()`, set
per RPC) sees and uses only its projects' artifacts: one in another project answers
exactly as a missing one does.
No grpc here: the servicer converts protos to these calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.adapter_registry.domain import Event, NewVersion, StoredFile, Version
from services.adapter_registry.metadata import MetadataStore
from services.adapter_registry.validation import DeclaredFile, check_contents, check_manifest
from services.common.audit import audit
from services.common.auth import principal
from services.common.blobs import CHUNK, BlobStore
from services.common.changes import Changes
from services.common.disk import close_quietly, disk_errors, is_full
from services.common.pages import Page
from tunedock.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tunedock.refs import Ref, check_alias, check_name, check_version

log = logging.getLogger(__name__)
WATCH_POLL_S = 1.0
"""A Watch also reads the store this often, so events committed by other registry replicas reach it."""


@dataclass(frozen=True)
class ManifestIn:
    """A publish request's manifest, as plain data."""

    name: str
    kind: str
    files: tuple[DeclaredFile, ...]
    lineage: dict
    labels: dict[str, str]
    description: str = ""
    project: str = ""
    """Empty: the artifact's project if it exists, else the caller's default project."""
    idempotency_key: str = ""
    """A publish with a key already used under this name returns that version (see the proto)."""


class PublishSession:
    """One in-progress publish. Feed `write()` the chunks, then `commit()`; `abort()` on any failure."""

    def __init__(self, registry: Registry, manifest: ManifestIn) -> None:
        self.registry = registry
        self.manifest = manifest
        self.declared = {f.path: f for f in manifest.files}
        self.dir = Path(tempfile.mkdtemp(prefix="publish-", dir=registry.staging_dir))
        self._hashes = {path: hashlib.sha256() for path in self.declared}
        self._written = dict.fromkeys(self.declared, 0)
        self._handles: dict[str, BinaryIO] = {}
        self._added_blobs: list[str] = []

    def write(self, path: str, offset: int, data: bytes) -> None:
        declared = self.declared.get(path)
        if declared is None:
            raise InvalidArgument(f"chunk for {path!r}, which the manifest does not list")
        if offset != self._written[path]:
            raise InvalidArgument(
                f"chunk for {path!r} at offset {offset}, expected {self._written[path]}: "
                "send each file's chunks in order"
            )
        if offset + len(data) > declared.size:
            raise InvalidArgument(f"file {path!r} is larger than the {declared.size} bytes the manifest declares")
        with self.registry.disk_errors(f"{path!r} of {self.manifest.name}", self.dir, declared.size - offset):
            handle = self._handles.get(path)
            if handle is None:
                target = self.dir / path
                target.parent.mkdir(parents=True, exist_ok=True)
                handle = self._handles[path] = target.open("wb")
            handle.write(data)
        self._hashes[path].update(data)
        self._written[path] += len(data)

    def commit(self) -> tuple[Version, bool]:
        with self.registry.disk_errors(f"the files of {self.manifest.name}", self.dir):
            for handle in self._handles.values():
                handle.close()
        for path, declared in self.declared.items():
            if self._written[path] != declared.size:
                raise InvalidArgument(
                    f"file {path!r} ended after {self._written[path]} of {declared.size} bytes; "
                    "the upload is incomplete"
                )
            if declared.size == 0:
                (self.dir / path).parent.mkdir(parents=True, exist_ok=True)
                (self.dir / path).touch()
            actual = self._hashes[path].hexdigest()
            if actual != declared.sha256:
                raise DataLoss(
                    f"file {path!r}: sha256 of the received bytes is {actual}, the manifest says {declared.sha256}; "
                    "the upload was corrupted, publish again"
                )
        m = self.manifest
        facts = check_contents(m.kind, self.dir, m.files)
        files = tuple(StoredFile(f.path, f.size, f.sha256) for f in sorted(m.files, key=lambda f: f.path))
        new = NewVersion(
            name=m.name,
            kind=m.kind,
            files=files,
            lineage=m.lineage,
            labels=m.labels,
            description=m.description,
            lora_rank=facts.rank if facts else 0,
            lora_alpha=facts.alpha if facts else 0.0,
            target_modules=facts.target_modules if facts else (),
            project=m.project,
            idempotency_key=m.idempotency_key,
            module_shapes=facts.module_shapes if facts else {},
        )
        existing = self.registry.metadata.find_existing(m.name, new.content_sha256, m.idempotency_key)
        if existing is not None:
            return existing, False
        # Held against delete_version's blob removal: a blob this publish relies on must not
        # vanish between "already stored" and the commit that references it.
        registry = self.registry
        with registry.blob_lock, registry.disk_errors(f"version of {m.name}", registry.staging_dir.parent):
            for f in files:
                if self.registry.blobs.put(f.sha256, self.dir / f.path):
                    self._added_blobs.append(f.sha256)
            version, created = self.registry.metadata.add_version(new)
            self._added_blobs.clear()  # committed: they are referenced now
        if created:
            audit("registry.publish", version.ref, version.project, content_sha256=version.content_sha256)
            self.registry.changes.notify()
        return version, created

    def abort(self) -> None:
        # Every handle closed whatever its flush says (a full disk fails the flush too), so close()'s
        # rmtree returns the space at once rather than when the process exits.
        for handle in self._handles.values():
            close_quietly(handle)
        if self._added_blobs:
            with self.registry.blob_lock:
                referenced = self.registry.metadata.referenced_blobs()
                for sha in self._added_blobs:
                    if sha not in referenced:
                        self.registry.blobs.delete(sha)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Registry:
    """Versioned, validated, atomic storage over a MetadataStore and a BlobStore."""

    def __init__(
        self, metadata: MetadataStore, blobs: BlobStore, staging_dir: Path, max_artifact_bytes: int, max_files: int
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.staging_dir = Path(staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.max_artifact_bytes = max_artifact_bytes
        self.max_files = max_files
        self.blob_lock = threading.RLock()
        self.changes = Changes()
        """Wakes Watch streams when this replica commits an event (other replicas' are polled)."""
        self.full_disk_seen: Callable[[], None] = lambda: None
        """Called (from any thread) when a write failed for want of space; the server probes then
        whether the registry can still write its state, and turns NOT_SERVING while it cannot."""

    @contextlib.contextmanager
    def disk_errors(self, what: str, where: Path, needed: int | None = None) -> Iterator[None]:
        """`services.common.disk.disk_errors`, telling `full_disk_seen` about a full disk."""
        try:
            with disk_errors(what, where, needed):
                yield
        except ResourceExhausted as exc:
            if isinstance(exc.__cause__, BaseException) and is_full(exc.__cause__):
                self.full_disk_seen()
            raise

    def begin_publish(self, manifest: ManifestIn) -> PublishSession:
        check_name(manifest.name)
        caller = principal()
        caller.check_publish_name(manifest.name)
        existing = self.metadata.artifact_project(manifest.name)
        if existing is None:
            project = caller.project_for_write(manifest.project)
        elif not caller.may_access(existing):
            # The name exists in a project the caller cannot see: it is taken, nothing more is said.
            raise AlreadyExists(f"the artifact name {manifest.name!r} is taken; publish under another name")
        elif manifest.project and manifest.project != existing:
            raise FailedPrecondition(
                f"artifact {manifest.name!r} belongs to project {existing!r}; its versions stay there"
            )
        else:
            project = existing
        manifest = ManifestIn(**{**manifest.__dict__, "project": project})
        check_manifest(manifest.kind, manifest.files, self.max_artifact_bytes, self.max_files)
        if len(manifest.idempotency_key) > 200:
            raise InvalidArgument(f"idempotency_key is {len(manifest.idempotency_key)} characters; at most 200")
        for key in manifest.labels:
            if not key or len(key) > 128 or len(manifest.labels[key]) > 512:
                raise InvalidArgument(f"label {key!r}: keys must be 1-128 characters, values at most 512")
        return PublishSession(self, manifest)

    def resolve(self, ref: str) -> Version:
        parsed = Ref.parse(ref)
        self.check_visible(parsed.name)
        return self.metadata.resolve(parsed)

    def check_visible(self, name: str) -> str:
        """The artifact's project; NotFound (the same answer as for a missing one) if the caller may not see it."""
        project = self.metadata.artifact_project(name)
        if project is None or not principal().may_access(project):
            raise NotFound(f"artifact {name!r} not found")
        return project

    def list_artifacts(self, kind: str, base_model: str, labels: dict, page_size: int, page_token: str, project: str):
        projects = principal().readable_projects(project)
        return self.metadata.list_artifacts(kind, base_model, labels, page_size, page_token, projects)

    def list_versions(self, name: str, page_size: int, page_token: str) -> Page:
        check_name(name)
        self.check_visible(name)
        return self.metadata.list_versions(name, page_size, page_token)

    def events_after(self, after: int, name: str):
        return self.metadata.events_after(after, name, projects=principal().readable_projects())

    def download(
        self, ref: str, path: str = "", offset: int = 0
    ) -> tuple[Version, Iterator[tuple[str, int, bytes, str]]]:
        """Resolve, then yield (path, offset, bytes, file_sha256-on-last-chunk) for the requested files."""
        version = self.resolve(ref)
        if offset < 0:
            raise InvalidArgument(f"offset must be >= 0, got {offset}")
        if offset and not path:
            raise InvalidArgument("an offset needs a path: resume one file at a time")
        files = [f for f in version.files if not path or f.path == path]
        if path and not files:
            raise InvalidArgument(
                f"{version.ref} has no file {path!r}; its files are {[f.path for f in version.files]}"
            )
        if files and offset > files[0].size:
            raise InvalidArgument(f"offset {offset} is past the end of {path!r} ({files[0].size} bytes)")
        return version, self._chunks(files, offset)

    def _chunks(self, files: list[StoredFile], offset: int) -> Iterator[tuple[str, int, bytes, str]]:
        for f in files:
            position = offset
            digest = hashlib.sha256() if offset == 0 else None
            pending: bytes | None = None
            for data in self.blobs.read(f.sha256, offset, CHUNK):
                if pending is not None:
                    yield f.path, position - len(pending), pending, ""
                if digest:
                    digest.update(data)
                position += len(data)
                pending = data
            if digest and digest.hexdigest() != f.sha256:
                raise DataLoss(f"stored bytes of {f.path!r} do not match their sha256; the blob store is corrupt")
            yield f.path, position - len(pending or b""), pending or b"", f.sha256
            offset = 0

    def set_alias(self, name: str, alias: str, version: int):
        check_name(name)
        check_alias(alias)
        check_version(version)
        project = self.check_visible(name)
        with self.disk_errors(f"the alias {name}@{alias}", self.staging_dir.parent):
            result = self.metadata.set_alias(name, alias, version)
        audit("registry.alias", f"{name}@{alias}", project, version=version, previous_version=result[1])
        self.changes.notify()
        return result

    def delete_alias(self, name: str, alias: str) -> int:
        project = self.check_visible(check_name(name))
        with self.disk_errors(f"the removal of {name}@{alias}", self.staging_dir.parent):
            previous = self.metadata.delete_alias(name, alias)
        audit("registry.delete_alias", f"{name}@{alias}", project, previous_version=previous)
        self.changes.notify()
        return previous

    def delete_version(self, name: str, version: int, force: bool) -> list[str]:
        check_name(name)
        check_version(version)
        project = self.check_visible(name)
        with self.blob_lock, self.disk_errors(f"the removal of {name}:{version}", self.staging_dir.parent):
            removed, unreferenced = self.metadata.delete_version(name, version, force)
            for sha in unreferenced:
                self.blobs.delete(sha)
        audit("registry.delete_version", f"{name}:{version}", project, force=force, removed_aliases=removed)
        self.changes.notify()
        return removed

    def watch_start(self, after_event_id: int, name: str) -> int:
        """Validate a Watch request; returns the event id to stream after (0 means: only new events)."""
        if after_event_id < 0:
            raise InvalidArgument("after_event_id must be >= 0")
        if name:
            check_name(name)
        return after_event_id or self.metadata.last_event_id()

    async def watch(self, after_event_id: int, name: str) -> AsyncIterator[Event]:
        """Events after `after_event_id` (0: from now on), then new ones as they are committed; never ends."""
        after = await asyncio.to_thread(self.watch_start, after_event_id, name)
        while True:
            changed = self.changes.current()
            events = await asyncio.to_thread(self.events_after, after, name)
            for event in events:
                yield event
                after = event.id
            if not events:
                await self.changes.wait(changed, WATCH_POLL_S)

    def collect_garbage(self) -> int:
        """Remove staging leftovers and blobs no version references (after a crash). Returns blobs removed."""
        for leftover in self.staging_dir.glob("publish-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        with self.blob_lock:
            referenced = self.metadata.referenced_blobs()
            orphans = [sha for sha in self.blobs.list() if sha not in referenced]
            for sha in orphans:
                self.blobs.delete(sha)
        if orphans:
            log.info("removed %d orphaned blobs", len(orphans))
        return len(orphans)
