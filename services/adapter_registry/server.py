"""Wires the registry core, its stores and servicer into a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.adapter_registry.core import Registry
from services.adapter_registry.metadata import MetadataStore
from services.adapter_registry.servicer import AdapterRegistryServicer
from services.adapter_registry.settings import RegistrySettings
from services.common.auth import method_roles
from services.common.blobs import LocalBlobStore, open_blob_store
from services.common.pages import MAX_PAGE_SIZE
from services.common.server import GrpcServer, ServiceBinding
from services.common.writable import WritableProbe
from tunedock import __version__
from tunedock.v1 import adapter_registry_pb2, adapter_registry_pb2_grpc

ROLES: dict[str, str | None] = {
    "GetRegistryInfo": None,  # any authenticated caller
    "Publish": "registry.publish",
    "GetVersion": "registry.read",
    "Resolve": "registry.read",
    "ListArtifacts": "registry.read",
    "ListVersions": "registry.read",
    "Download": "registry.read",
    "Watch": "registry.read",
    "SetAlias": "registry.admin",
    "DeleteAlias": "registry.admin",
    "DeleteVersion": "registry.admin",
}


def build_registry(settings: RegistrySettings) -> Registry:
    metadata = MetadataStore(settings.database_url)
    registry = Registry(
        metadata,
        open_blob_store(settings.blob_url, settings.s3_endpoint_url),
        staging_dir=settings.data_dir / "registry" / "staging",
        max_artifact_bytes=settings.max_artifact_mb * 1024 * 1024,
        max_files=settings.max_files,
    )
    registry.collect_garbage()
    return registry


def registry_info(settings: RegistrySettings) -> dict:
    """GetRegistryInfo's answer: fixed by the settings."""
    database = settings.database_url or "sqlite://"
    return {
        "version": __version__,
        "metadata_backend": "postgresql" if database.startswith("postgresql") else database.partition(":")[0],
        "blob_backend": "s3" if settings.blob_url.startswith("s3://") else "local",
        "artifact_kinds": ["lora_adapter", "model", "delta"],
        "max_artifact_bytes": settings.max_artifact_mb * 1024 * 1024,
        "max_files": settings.max_files,
        "max_message_bytes": settings.max_message_mb * 1024 * 1024,
        "max_page_size": MAX_PAGE_SIZE,
    }


async def build_server(settings: RegistrySettings) -> GrpcServer:
    registry = await asyncio.to_thread(build_registry, settings)
    service = adapter_registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistryService"]
    server = GrpcServer(
        settings,
        [
            ServiceBinding(
                service.full_name,
                AdapterRegistryServicer(registry, registry_info(settings)),
                adapter_registry_pb2_grpc.add_AdapterRegistryServiceServicer_to_server,
            )
        ],
        roles=method_roles(service, ROLES),
    )
    probe = WritableProbe(state_dirs(settings, registry), server.set_serving)
    registry.full_disk_seen = probe.full_disk_seen
    server.after_start.append(lambda: server.supervise("writable-probe", probe.run))
    server.on_stop.append(registry.metadata.close)
    return server


def state_dirs(settings: RegistrySettings, registry: Registry) -> list[Path]:
    """Where the registry writes its state: staging, local blobs, a SQLite database's directory."""
    dirs = [registry.staging_dir]
    if isinstance(registry.blobs, LocalBlobStore):
        dirs.append(registry.blobs.root)
    if registry.metadata.is_sqlite:
        database = registry.metadata.engine.url.database
        if database and database != ":memory:":
            dirs.append(Path(database).parent)
    return dirs
