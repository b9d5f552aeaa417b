"""gRPC servicer: converts protos to core calls and back. No business logic here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from google.protobuf import json_format
from grpc import aio

from services.adapter_registry.core import ManifestIn, Registry
from services.adapter_registry.domain import Artifact, Event, Version
from services.adapter_registry.validation import DeclaredFile
from tunedock.errors import InvalidArgument
from tunedock.v1 import adapter_registry_pb2 as pb
from tunedock.v1 import adapter_registry_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

KIND_NAMES = {
    pb.ARTIFACT_KIND_LORA_ADAPTER: "lora_adapter",
    pb.ARTIFACT_KIND_MODEL: "model",
    pb.ARTIFACT_KIND_DELTA: "delta",
}
KIND_ENUMS = {v: k for k, v in KIND_NAMES.items()}
EVENT_TYPES = {
    "published": pb.EVENT_TYPE_PUBLISHED,
    "alias_moved": pb.EVENT_TYPE_ALIAS_MOVED,
    "alias_deleted": pb.EVENT_TYPE_ALIAS_DELETED,
    "version_deleted": pb.EVENT_TYPE_VERSION_DELETED,
}


def labels_to_dict(labels) -> dict[str, str]:
    out: dict[str, str] = {}
    for label in labels:
        if label.key in out:
            raise InvalidArgument(f"label {label.key!r} is given twice")
        out[label.key] = label.value
    return out


def version_to_proto(v: Version) -> pb.ArtifactVersion:
    msg = pb.ArtifactVersion(
        name=v.name,
        version=v.version,
        kind=KIND_ENUMS[v.kind],
        content_sha256=v.content_sha256,
        size=v.size,
        description=v.description,
        lora_rank=v.lora_rank,
        lora_alpha=v.lora_alpha,
        target_modules=list(v.target_modules),
        aliases=list(v.aliases),
        files=[pb.FileEntry(path=f.path, size=f.size, sha256=f.sha256) for f in v.files],
        labels=[common_pb2.Label(key=k, value=val) for k, val in sorted(v.labels.items())],
    )
    json_format.ParseDict(v.lineage, msg.lineage, ignore_unknown_fields=True)
    msg.create_time.FromDatetime(v.created_at)
    msg.project = v.project
    msg.module_shapes.extend(
        pb.ModuleShape(module=m, in_features=s[0], out_features=s[1]) for m, s in sorted(v.module_shapes.items())
    )
    return msg


def artifact_to_proto(a: Artifact) -> pb.Artifact:
    msg = pb.Artifact(
        name=a.name,
        kind=KIND_ENUMS[a.kind],
        latest_version=a.latest_version,
        aliases=a.aliases,
        base_model=a.base_model,
        labels=[common_pb2.Label(key=k, value=v) for k, v in sorted(a.labels.items())],
        project=a.project,
    )
    msg.update_time.FromDatetime(a.updated_at)
    return msg


def event_to_proto(e: Event) -> pb.WatchResponse:
    msg = pb.WatchResponse(
        event_id=e.id,
        type=EVENT_TYPES[e.type],
        name=e.name,
        version=e.version,
        alias=e.alias,
        content_sha256=e.content_sha256,
    )
    msg.create_time.FromDatetime(e.created_at)
    return msg


class AdapterRegistryServicer(adapter_registry_pb2_grpc.AdapterRegistryServiceServicer):
    def __init__(self, registry: Registry, info: dict | None = None) -> None:
        self.registry = registry
        self.info = info or {}

    async def Publish(
        self, request_iterator: AsyncIterator[pb.PublishRequest], context: aio.ServicerContext
    ) -> pb.PublishResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("manifest"):
            raise InvalidArgument("the first message of a Publish stream must be the manifest")
        m = first.manifest
        if m.kind not in KIND_NAMES:
            raise InvalidArgument("manifest.kind must be LORA_ADAPTER, MODEL or DELTA")
        manifest = ManifestIn(
            name=m.name,
            kind=KIND_NAMES[m.kind],
            files=tuple(DeclaredFile(f.path, f.size, f.sha256) for f in m.files),
            lineage=json_format.MessageToDict(m.lineage),
            labels=labels_to_dict(m.labels),
            description=m.description,
            project=m.project,
            idempotency_key=m.idempotency_key,
        )
        session = await asyncio.to_thread(self.registry.begin_publish, manifest)
        try:
            async for request in request_iterator:
                if not request.HasField("chunk"):
                    raise InvalidArgument("only the first message of a Publish stream may be a manifest")
                session.write(request.chunk.path, request.chunk.offset, request.chunk.data)
            version, created = await asyncio.to_thread(session.commit)
        except BaseException:
            # Client gone, bad chunk, checksum or validation failure: nothing becomes visible.
            session.abort()
            raise
        finally:
            session.close()
        if created:
            log.info(
                "published %s",
                version.ref,
                extra={"artifact": version.name, "version": version.version, "bytes": version.size},
            )
        return pb.PublishResponse(version=version_to_proto(version), deduplicated=not created)

    async def GetVersion(self, request: pb.GetVersionRequest, context: aio.ServicerContext) -> pb.GetVersionResponse:
        version = await asyncio.to_thread(self.registry.resolve, request.ref)
        return pb.GetVersionResponse(version=version_to_proto(version))

    async def Resolve(self, request: pb.ResolveRequest, context: aio.ServicerContext) -> pb.ResolveResponse:
        v = await asyncio.to_thread(self.registry.resolve, request.ref)
        return pb.ResolveResponse(
            name=v.name, version=v.version, content_sha256=v.content_sha256, kind=KIND_ENUMS[v.kind], project=v.project
        )

    async def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: aio.ServicerContext
    ) -> pb.ListArtifactsResponse:
        kind = KIND_NAMES.get(request.kind, "") if request.kind else ""
        if request.kind and not kind:
            raise InvalidArgument(f"unknown artifact kind {request.kind}")
        page = await asyncio.to_thread(
            self.registry.list_artifacts,
            kind,
            request.base_model,
            labels_to_dict(request.labels),
            request.page_size,
            request.page_token,
            request.project,
        )
        return pb.ListArtifactsResponse(
            artifacts=[artifact_to_proto(a) for a in page.items], next_page_token=page.next_token
        )

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: aio.ServicerContext
    ) -> pb.ListVersionsResponse:
        page = await asyncio.to_thread(self.registry.list_versions, request.name, request.page_size, request.page_token)
        return pb.ListVersionsResponse(
            versions=[version_to_proto(v) for v in page.items], next_page_token=page.next_token
        )

    async def Download(
        self, request: pb.DownloadRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadResponse]:
        version, chunks = await asyncio.to_thread(self.registry.download, request.ref, request.path, request.offset)
        yield pb.DownloadResponse(version=version_to_proto(version))
        while (item := await asyncio.to_thread(next, chunks, None)) is not None:
            path, offset, data, sha = item
            yield pb.DownloadResponse(chunk=pb.FileChunk(path=path, offset=offset, data=data), file_sha256=sha)

    async def SetAlias(self, request: pb.SetAliasRequest, context: aio.ServicerContext) -> pb.SetAliasResponse:
        version, previous = await asyncio.to_thread(
            self.registry.set_alias, request.name, request.alias, request.version
        )
        return pb.SetAliasResponse(version=version_to_proto(version), previous_version=previous)

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context: aio.ServicerContext) -> pb.DeleteAliasResponse:
        previous = await asyncio.to_thread(self.registry.delete_alias, request.name, request.alias)
        return pb.DeleteAliasResponse(previous_version=previous)

    async def DeleteVersion(
        self, request: pb.DeleteVersionRequest, context: aio.ServicerContext
    ) -> pb.DeleteVersionResponse:
        removed = await asyncio.to_thread(self.registry.delete_version, request.name, request.version, request.force)
        return pb.DeleteVersionResponse(removed_aliases=removed)

    async def Watch(self, request: pb.WatchRequest, context: aio.ServicerContext) -> AsyncIterator[pb.WatchResponse]:
        async for event in self.registry.watch(request.after_event_id, request.name):
            yield event_to_proto(event)

    async def GetRegistryInfo(
        self, request: pb.GetRegistryInfoRequest, context: aio.ServicerContext
    ) -> pb.GetRegistryInfoResponse:
        return pb.GetRegistryInfoResponse(**self.info)
