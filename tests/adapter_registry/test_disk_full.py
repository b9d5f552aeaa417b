"""A registry whose disk fills mid-publish: RESOURCE_EXHAUSTED saying where and how much is free, the
space back at once (no staging file left open), and the next publish that fits succeeds without a
restart. The data dir is a real 20 MiB tmpfs mounted by the test (root; CI runs as root)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.adapter_registry.conftest import RegistryBackend
from tunedock.client import RegistryClient


def test_a_publish_that_fills_the_disk_is_refused_and_gives_the_space_back(small_disk, adapter_dir, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(adapter_dir, big)
    (big / "adapter_model.safetensors").write_bytes(os.urandom(30 << 20))  # 30 MiB into 20 MiB
    server = RegistryBackend("sqlite+dir", small_disk).start()
    try:
        with RegistryClient(server.address) as client:
            free_before = shutil.disk_usage(small_disk).free
            with pytest.raises(grpc.RpcError) as info:
                client.publish_dir(big, "too-big")
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = info.value.details()
            assert details.startswith("no space left on the device writing 'adapter_model.safetensors' of too-big")
            assert str(small_disk) in details and "free" in details and "needed ~" in details
            # Every staging byte is gone and no descriptor holds a deleted file: the space is back now.
            assert shutil.disk_usage(small_disk).free >= free_before - (1 << 20)
            held = [os.readlink(f) for f in Path("/proc/self/fd").iterdir() if _deleted_under(f, small_disk)]
            assert held == []
            time.sleep(0.5)  # the probe a full disk triggers: the disk has room again, health stays SERVING
            assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING
            published = client.publish_dir(adapter_dir, "fits")
            assert published.version.version == 1 and client.get("fits:1").content_sha256
            with pytest.raises(grpc.RpcError) as gone:
                client.get("too-big")
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


def _deleted_under(fd: Path, root: Path) -> bool:
    try:
        target = os.readlink(fd)
    except OSError:
        return False
    return target.startswith(str(root)) and target.endswith("(deleted)")


def test_a_registry_that_cannot_write_its_state_is_not_serving_until_it_can(small_disk, adapter_dir, tmp_path):
    server = RegistryBackend("sqlite+dir", small_disk).start()
    filler = small_disk / "filler"
    try:
        with RegistryClient(server.address) as client:
            client.publish_dir(adapter_dir, "first")
            with filler.open("wb") as fh:  # another tenant of the volume takes all but 64 KiB
                fh.write(b"\0" * (shutil.disk_usage(small_disk).free - (64 << 10)))
            other = tmp_path / "other"
            shutil.copytree(adapter_dir, other)
            (other / "README.md").write_text("another version")
            with pytest.raises(grpc.RpcError) as info:
                client.publish_dir(other, "first")
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            _wait_health(server.address, health_pb2.HealthCheckResponse.NOT_SERVING)
            assert client.get("first:1").version == 1  # reads still answer
            filler.unlink()
            _wait_health(server.address, health_pb2.HealthCheckResponse.SERVING)
            assert client.publish_dir(other, "first").version.version == 2
    finally:
        server.stop()


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _wait_health(address: str, status: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _health(address) != status:
        assert time.monotonic() < deadline, (
            f"health did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        )
        time.sleep(0.2)


def test_a_full_object_store_is_resource_exhausted_and_the_next_put_that_fits_succeeds(s3_endpoint, tmp_path):
    """S3's disk-full: MinIO answers XMinioStorageFull (HTTP 507) when its drives are full, Ceph RGW
    QuotaExceeded. The answer is injected at the client's edge (moto has no quotas); the rest is real."""
    import boto3
    from botocore.awsrequest import AWSResponse

    from services.common.blobs import S3BlobStore
    from tunedock.errors import ResourceExhausted

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="full")
    store = S3BlobStore("s3://full/blobs", s3_endpoint)
    full = {"on": True}

    def storage_full(**_):
        if not full["on"]:
            return None
        error = {
            "Code": "XMinioStorageFull",
            "Message": "Storage backend has reached its minimum free drive threshold.",
        }
        return AWSResponse(s3_endpoint, 507, {}, None), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 507}}

    store.client.meta.events.register("before-call.s3.PutObject", storage_full)
    blob = tmp_path / "blob"
    blob.write_bytes(b"adapter bytes")
    sha = "ab" * 32
    with pytest.raises(ResourceExhausted) as info:
        store.put(sha, blob)
    assert "no room in s3://full" in info.value.message and "XMinioStorageFull" in info.value.message
    assert not store.exists(sha)
    full["on"] = False
    assert store.put(sha, blob) and b"".join(store.read(sha)) == b"adapter bytes"
