"""Content-addressed blob storage: a local directory (default) or S3-compatible object storage.

Blobs are keyed by their sha256, so identical files across versions are stored once and a
blob is immutable once written. `put` is atomic on both backends (rename into place; S3
objects appear only when their upload completes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from tunedock.errors import DataLoss, NotFound, ResourceExhausted, TuneDockError, Unavailable

CHUNK = 1024 * 1024


class BlobStore(Protocol):
    """The narrow interface the registry needs from blob storage."""

    def put(self, sha256: str, source: Path) -> bool:
        """Store `source` under `sha256`; False when it was already there."""

    def exists(self, sha256: str) -> bool: ...

    def read(self, sha256: str, offset: int = 0, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Yield the blob's bytes from `offset`."""

    def delete(self, sha256: str) -> None: ...

    def list(self) -> Iterator[str]:
        """Every stored sha256 (for garbage collection)."""


class LocalBlobStore:
    """Blobs as files `<root>/<sha[:2]>/<sha>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, source: Path) -> bool:
        target = self._path(sha256)
        if target.exists():
            return False
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f".{sha256}.{os.getpid()}.{id(source)}.tmp")
        try:
            # A hard link is free when staging is on the same filesystem; copy otherwise.
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def read(self, sha256: str, offset: int = 0, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            fh = self._path(sha256).open("rb")
        except FileNotFoundError:
            raise DataLoss(f"blob {sha256} is missing from the blob store") from None
        with fh:
            fh.seek(offset)
            while chunk := fh.read(chunk_size):
                yield chunk

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def list(self) -> Iterator[str]:
        for sub in self.root.iterdir():
            if sub.is_dir():
                for blob in sub.iterdir():
                    if not blob.name.startswith("."):
                        yield blob.name
                    elif blob.name.endswith(".tmp"):
                        blob.unlink(missing_ok=True)  # left by a crash mid-put


class S3BlobStore:
    """Blobs as objects `<prefix>/<sha[:2]>/<sha>` in an S3-compatible bucket (multipart for large files)."""

    def __init__(self, url: str, endpoint_url: str = "") -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
        )
        self.transfer = TransferConfig(multipart_threshold=64 * CHUNK, multipart_chunksize=16 * CHUNK)

    def _key(self, sha256: str) -> str:
        return f"{self.prefix}/{sha256[:2]}/{sha256}" if self.prefix else f"{sha256[:2]}/{sha256}"

    def _call(self, fn, *args, **kwargs):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, S3UploadFailedError) as exc:
            # upload_file wraps the ClientError of a failed part in S3UploadFailedError (as its context)
            client_error = exc if isinstance(exc, ClientError) else exc.__context__
            raise s3_status(client_error if isinstance(client_error, ClientError) else exc, self.bucket) from None
        except BotoCoreError as exc:
            raise Unavailable(f"S3 unreachable: {exc}") from None

    def put(self, sha256: str, source: Path) -> bool:
        if self.exists(sha256):
            return False
        self._call(self.client.upload_file, str(source), self.bucket, self._key(sha256), Config=self.transfer)
        return True

    def exists(self, sha256: str) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(sha256))
            return True
        except NotFound:
            return False

    def read(self, sha256: str, offset: int = 0, chunk_size: int = CHUNK) -> Iterator[bytes]:
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            body = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(sha256), **kwargs)["Body"]
        except NotFound:
            raise DataLoss(f"blob {sha256} is missing from s3://{self.bucket}") from None
        with body:
            yield from body.iter_chunks(chunk_size)

    def delete(self, sha256: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(sha256))

    def list(self) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix))):
            for obj in page.get("Contents", []):
                yield obj["Key"].rsplit("/", 1)[-1]


S3_FULL = {
    "XMinioStorageFull": "the object store has no free space left",
    "XMinioAdminBucketQuotaExceeded": "the bucket's quota is used up",
    "QuotaExceeded": "the bucket's (or user's) quota is used up",
    "InsufficientStorage": "the object store has no free space left",
    "EntityTooLarge": "the object is larger than the store accepts in one upload",
}
"""S3-compatible stores' answers for "no room" (MinIO, Ceph RGW, and others; HTTP 507 whatever the code)."""


def s3_status(exc: Exception, bucket: str) -> TuneDockError:
    """A failed S3 call as a status: NOT_FOUND for a missing key, RESOURCE_EXHAUSTED where the store is
    full or over quota (the disk-full of object storage), UNAVAILABLE otherwise (retryable)."""
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", "") or exc)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("404", "NoSuchKey", "NotFound"):
        return NotFound(f"blob not found in s3://{bucket}")
    if code in S3_FULL or status == 507:
        why = S3_FULL.get(code, "the object store has no free space left")
        return ResourceExhausted(
            f"no room in s3://{bucket}: {why} ({code or status}: {message}); free space or raise the quota there, "
            "then try again"
        )
    return Unavailable(f"S3 error on bucket {bucket}: {exc}")


def open_blob_store(url: str, endpoint_url: str = "") -> BlobStore:
    """`s3://bucket/prefix` for S3-compatible storage, anything else is a local directory."""
    if url.startswith("s3://"):
        return S3BlobStore(url, endpoint_url)
    return LocalBlobStore(Path(url))
