"""Adapter registry settings."""

from __future__ import annotations

from typing import Any, ClassVar

from services.common.settings import ServerSettings, setting
from tunedock.errors import InvalidArgument


class RegistrySettings(ServerSettings):
    """Settings of `python -m services.adapter_registry`."""

    ENV_PREFIX: ClassVar[str] = "TUNEDOCK_REGISTRY_"
    SERVICE_NAME: ClassVar[str] = "adapter_registry"
    DEFAULT_PORT: ClassVar[int] = 50052

    database_url: str = setting(
        "", "SQLAlchemy URL of the metadata store; empty means sqlite:///<data-dir>/registry/registry.db"
    )
    blob_url: str = setting(
        "", "blob store: empty means <data-dir>/registry/blobs; s3://bucket/prefix for S3-compatible storage"
    )
    s3_endpoint_url: str = setting("", "S3 endpoint URL (MinIO, Ceph, moto ...); empty means AWS")
    max_artifact_mb: int = setting(20480, "largest artifact accepted, in MiB")
    max_files: int = setting(10000, "most files in one artifact")
    worker_key_file: str = setting("", "the trainer's worker-token key, so training workers can publish their output")

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.max_artifact_mb <= 0 or self.max_files <= 0:
            raise InvalidArgument("max_artifact_mb and max_files must be > 0")
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'registry' / 'registry.db'}"
        if not self.blob_url:
            self.blob_url = str(self.data_dir / "registry" / "blobs")
