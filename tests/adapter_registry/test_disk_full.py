"""A registry whose disk fills mid-publish: RESOURCE_EXHAUSTED saying where and how much is free, the
space back at once (no staging file left open), and the next publish that fits succeeds without a
restart. The data dir is a real 20 MiB tmpfs mounted by the test (root; CI runs as root)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest

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
