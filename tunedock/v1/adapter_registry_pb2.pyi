import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tunedock.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_LORA_ADAPTER: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_MODEL: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_DELTA: _ClassVar[ArtifactKind]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_PUBLISHED: _ClassVar[EventType]
    EVENT_TYPE_ALIAS_MOVED: _ClassVar[EventType]
    EVENT_TYPE_ALIAS_DELETED: _ClassVar[EventType]
    EVENT_TYPE_VERSION_DELETED: _ClassVar[EventType]
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_LORA_ADAPTER: ArtifactKind
ARTIFACT_KIND_MODEL: ArtifactKind
ARTIFACT_KIND_DELTA: ArtifactKind
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_PUBLISHED: EventType
EVENT_TYPE_ALIAS_MOVED: EventType
EVENT_TYPE_ALIAS_DELETED: EventType
EVENT_TYPE_VERSION_DELETED: EventType

class FileEntry(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("base_model", "base_fingerprint", "method", "method_config", "job_id", "dataset_ids", "hyperparameters", "metrics", "extracted_from")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_CONFIG_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_IDS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EXTRACTED_FROM_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    base_fingerprint: str
    method: _common_pb2.Method
    method_config: _common_pb2.MethodConfig
    job_id: str
    dataset_ids: _containers.RepeatedScalarFieldContainer[str]
    hyperparameters: _struct_pb2.Struct
    metrics: _containers.RepeatedCompositeFieldContainer[_common_pb2.Metric]
    extracted_from: str
    def __init__(self, base_model: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., method: _Optional[_Union[_common_pb2.Method, str]] = ..., method_config: _Optional[_Union[_common_pb2.MethodConfig, _Mapping]] = ..., job_id: _Optional[str] = ..., dataset_ids: _Optional[_Iterable[str]] = ..., hyperparameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[_common_pb2.Metric, _Mapping]]] = ..., extracted_from: _Optional[str] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("name", "kind", "files", "lineage", "labels", "description", "project", "idempotency_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ArtifactKind
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    lineage: Lineage
    labels: _containers.RepeatedCompositeFieldContainer[_common_pb2.Label]
    description: str
    project: str
    idempotency_key: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., labels: _Optional[_Iterable[_Union[_common_pb2.Label, _Mapping]]] = ..., description: _Optional[str] = ..., project: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "offset", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    chunk: FileChunk
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class ArtifactVersion(_message.Message):
    __slots__ = ("name", "version", "kind", "files", "content_sha256", "size", "lineage", "labels", "description", "lora_rank", "lora_alpha", "target_modules", "aliases", "create_time", "project", "module_shapes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    MODULE_SHAPES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    kind: ArtifactKind
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    content_sha256: str
    size: int
    lineage: Lineage
    labels: _containers.RepeatedCompositeFieldContainer[_common_pb2.Label]
    description: str
    lora_rank: int
    lora_alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    project: str
    module_shapes: _containers.RepeatedCompositeFieldContainer[ModuleShape]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., content_sha256: _Optional[str] = ..., size: _Optional[int] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., labels: _Optional[_Iterable[_Union[_common_pb2.Label, _Mapping]]] = ..., description: _Optional[str] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., aliases: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., project: _Optional[str] = ..., module_shapes: _Optional[_Iterable[_Union[ModuleShape, _Mapping]]] = ...) -> None: ...

class ModuleShape(_message.Message):
    __slots__ = ("module", "in_features", "out_features")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    module: str
    in_features: int
    out_features: int
    def __init__(self, module: _Optional[str] = ..., in_features: _Optional[int] = ..., out_features: _Optional[int] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("version", "deduplicated")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    version: ArtifactVersion
    deduplicated: bool
    def __init__(self, version: _Optional[_Union[ArtifactVersion, _Mapping]] = ..., deduplicated: _Optional[bool] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class GetVersionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: ArtifactVersion
    def __init__(self, version: _Optional[_Union[ArtifactVersion, _Mapping]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("name", "version", "content_sha256", "kind", "project")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    content_sha256: str
    kind: ArtifactKind
    project: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., content_sha256: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., project: _Optional[str] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "kind", "latest_version", "aliases", "base_model", "labels", "update_time", "project")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ArtifactKind
    latest_version: int
    aliases: _containers.ScalarMap[str, int]
    base_model: str
    labels: _containers.RepeatedCompositeFieldContainer[_common_pb2.Label]
    update_time: _timestamp_pb2.Timestamp
    project: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., latest_version: _Optional[int] = ..., aliases: _Optional[_Mapping[str, int]] = ..., base_model: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[_common_pb2.Label, _Mapping]]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., project: _Optional[str] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("kind", "base_model", "labels", "page_size", "page_token", "project")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    kind: ArtifactKind
    base_model: str
    labels: _containers.RepeatedCompositeFieldContainer[_common_pb2.Label]
    page_size: int
    page_token: str
    project: str
    def __init__(self, kind: _Optional[_Union[ArtifactKind, str]] = ..., base_model: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[_common_pb2.Label, _Mapping]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., project: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts", "next_page_token")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    next_page_token: str
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("name", "page_size", "page_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    page_size: int
    page_token: str
    def __init__(self, name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ArtifactVersion]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[ArtifactVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("ref", "path", "offset")
    REF_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ref: str
    path: str
    offset: int
    def __init__(self, ref: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadResponse(_message.Message):
    __slots__ = ("version", "chunk", "file_sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    version: ArtifactVersion
    chunk: FileChunk
    file_sha256: str
    def __init__(self, version: _Optional[_Union[ArtifactVersion, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ..., file_sha256: _Optional[str] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: int
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("version", "previous_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: ArtifactVersion
    previous_version: int
    def __init__(self, version: _Optional[_Union[ArtifactVersion, _Mapping]] = ..., previous_version: _Optional[int] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("name", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class DeleteAliasResponse(_message.Message):
    __slots__ = ("previous_version",)
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    previous_version: int
    def __init__(self, previous_version: _Optional[int] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("name", "version", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    force: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteVersionResponse(_message.Message):
    __slots__ = ("removed_aliases",)
    REMOVED_ALIASES_FIELD_NUMBER: _ClassVar[int]
    removed_aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed_aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("after_event_id", "name")
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    after_event_id: int
    name: str
    def __init__(self, after_event_id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("event_id", "type", "name", "version", "alias", "content_sha256", "create_time")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    type: EventType
    name: str
    version: int
    alias: str
    content_sha256: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[int] = ..., type: _Optional[_Union[EventType, str]] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., content_sha256: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetRegistryInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRegistryInfoResponse(_message.Message):
    __slots__ = ("version", "metadata_backend", "blob_backend", "artifact_kinds", "max_artifact_bytes", "max_files", "max_message_bytes", "max_page_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METADATA_BACKEND_FIELD_NUMBER: _ClassVar[int]
    BLOB_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_KINDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ARTIFACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: str
    metadata_backend: str
    blob_backend: str
    artifact_kinds: _containers.RepeatedScalarFieldContainer[str]
    max_artifact_bytes: int
    max_files: int
    max_message_bytes: int
    max_page_size: int
    def __init__(self, version: _Optional[str] = ..., metadata_backend: _Optional[str] = ..., blob_backend: _Optional[str] = ..., artifact_kinds: _Optional[_Iterable[str]] = ..., max_artifact_bytes: _Optional[int] = ..., max_files: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_page_size: _Optional[int] = ...) -> None: ...
