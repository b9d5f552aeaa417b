"""Adapter registry SDK: publish a directory, download a version, resolve, list, aliases."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tunedock.client.channel import ServiceClient, pages
from tunedock.v1 import adapter_registry_pb2 as pb
from tunedock.v1 import adapter_registry_pb2_grpc, common_pb2

CHUNK = 1024 * 1024
KINDS = {
    "lora_adapter": pb.ARTIFACT_KIND_LORA_ADAPTER,
    "model": pb.ARTIFACT_KIND_MODEL,
    "delta": pb.ARTIFACT_KIND_DELTA,
}


class ChecksumMismatch(Exception):
    """Downloaded bytes do not match the registry's sha256."""


@dataclass(frozen=True)
class LocalFile:
    path: str
    source: Path
    size: int
    sha256: str


def scan_directory(root: Path) -> list[LocalFile]:
    """Every regular file under `root` with size and sha256; symlinks are refused."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            source = Path(dirpath) / name
            rel = source.relative_to(root).as_posix()
            if source.is_symlink():
                raise ValueError(f"{rel} is a symbolic link; the registry stores plain files only")
            digest = hashlib.sha256()
            with source.open("rb") as fh:
                while block := fh.read(CHUNK):
                    digest.update(block)
            files.append(LocalFile(rel, source, source.stat().st_size, digest.hexdigest()))
    return files


class RegistryClient(ServiceClient):
    """Typed wrapper over `AdapterRegistryService`."""

    STUB = adapter_registry_pb2_grpc.AdapterRegistryServiceStub

    def publish_dir(
        self,
        directory: Path,
        name: str,
        kind: str = "lora_adapter",
        lineage: pb.Lineage | None = None,
        labels: Mapping[str, str] | None = None,
        description: str = "",
        timeout: float | None = None,
        project: str = "",
        idempotency_key: str = "",
    ) -> pb.PublishResponse:
        """Publish every file under `directory` as a new version of `name` (atomic).

        `project`: where a new artifact goes (empty: the caller's default project).
        `idempotency_key`: a second publish of `name` with the same key returns the first's version.
        """
        files = scan_directory(Path(directory))
        manifest = pb.Manifest(
            name=name,
            kind=KINDS[kind],
            description=description,
            project=project,
            idempotency_key=idempotency_key,
            files=[pb.FileEntry(path=f.path, size=f.size, sha256=f.sha256) for f in files],
            labels=[common_pb2.Label(key=k, value=v) for k, v in (labels or {}).items()],
        )
        if lineage is not None:
            manifest.lineage.CopyFrom(lineage)
        return self.stub.Publish(_publish_stream(manifest, files), timeout=timeout or self.timeout * 10)

    def info(self) -> pb.GetRegistryInfoResponse:
        """How this registry stores artifacts and what it accepts (any token may ask)."""
        return self.stub.GetRegistryInfo(pb.GetRegistryInfoRequest(), timeout=self.timeout)

    def resolve(self, ref: str) -> pb.ResolveResponse:
        return self.stub.Resolve(pb.ResolveRequest(ref=ref), timeout=self.timeout)

    def get(self, ref: str) -> pb.ArtifactVersion:
        return self.stub.GetVersion(pb.GetVersionRequest(ref=ref), timeout=self.timeout).version

    def list_artifacts(
        self, kind: str = "", base_model: str = "", labels: Mapping[str, str] | None = None, page_size: int = 0
    ) -> Iterator[pb.Artifact]:
        """Every matching artifact, following page tokens."""
        request = pb.ListArtifactsRequest(
            kind=KINDS.get(kind, pb.ARTIFACT_KIND_UNSPECIFIED),
            base_model=base_model,
            page_size=page_size,
            labels=[common_pb2.Label(key=k, value=v) for k, v in (labels or {}).items()],
        )
        return pages(self.stub.ListArtifacts, request, "artifacts", self.timeout)

    def list_versions(self, name: str, page_size: int = 0) -> Iterator[pb.ArtifactVersion]:
        request = pb.ListVersionsRequest(name=name, page_size=page_size)
        return pages(self.stub.ListVersions, request, "versions", self.timeout)

    def set_alias(self, name: str, alias: str, version: int) -> pb.SetAliasResponse:
        return self.stub.SetAlias(pb.SetAliasRequest(name=name, alias=alias, version=version), timeout=self.timeout)

    def delete_alias(self, name: str, alias: str) -> int:
        return self.stub.DeleteAlias(
            pb.DeleteAliasRequest(name=name, alias=alias), timeout=self.timeout
        ).previous_version

    def delete_version(self, name: str, version: int, force: bool = False) -> list[str]:
        reply = self.stub.DeleteVersion(
            pb.DeleteVersionRequest(name=name, version=version, force=force), timeout=self.timeout
        )
        return list(reply.removed_aliases)

    def watch(self, after_event_id: int = 0, name: str = "", timeout: float | None = None):
        """Registry events as they happen (a server-streaming call; cancel() it to stop)."""
        return self.stub.Watch(pb.WatchRequest(after_event_id=after_event_id, name=name), timeout=timeout)

    def download(self, ref: str, destination: Path, timeout: float | None = None) -> pb.ArtifactVersion:
        """Download every file of `ref` into `destination`, verifying each sha256.

        Files land in a staging directory beside `destination`, which replaces it only when
        every file is complete and verified.
        """
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=destination.parent))
        handles: dict[str, tuple] = {}
        try:
            version = None
            for message in self.stub.Download(pb.DownloadRequest(ref=ref), timeout=timeout or self.timeout * 10):
                if message.HasField("version"):
                    version = message.version
                    continue
                chunk = message.chunk
                if chunk.path not in handles:
                    target = staging / chunk.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    handles[chunk.path] = (target.open("wb"), hashlib.sha256())
                fh, digest = handles[chunk.path]
                fh.write(chunk.data)
                digest.update(chunk.data)
                if message.file_sha256 and digest.hexdigest() != message.file_sha256:
                    raise ChecksumMismatch(f"{chunk.path}: downloaded bytes do not match sha256 {message.file_sha256}")
            for fh, _ in handles.values():
                fh.close()
            expected = {f.path: f.sha256 for f in version.files} if version else {}
            got = {path: digest.hexdigest() for path, (_, digest) in handles.items()}
            if version is None or got != expected:
                raise ChecksumMismatch(f"downloaded files of {ref} do not match the registry's manifest")
            if destination.exists():
                shutil.rmtree(destination)
            staging.rename(destination)
            return version
        finally:
            for fh, _ in handles.values():
                fh.close()
            shutil.rmtree(staging, ignore_errors=True)


def _publish_stream(manifest: pb.Manifest, files: list[LocalFile]) -> Iterator[pb.PublishRequest]:
    yield pb.PublishRequest(manifest=manifest)
    for f in files:
        with f.source.open("rb") as fh:
            offset = 0
            while block := fh.read(CHUNK):
                yield pb.PublishRequest(chunk=pb.FileChunk(path=f.path, offset=offset, data=block))
                offset += len(block)
