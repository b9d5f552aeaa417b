"""Each limit through a real server: a clear status, and nothing stored."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest

from services.adapter_registry.server import build_server as build_registry
from services.adapter_registry.settings import RegistrySettings
from services.common.server_thread import ServerThread
from services.inference.server import build_server as build_inference
from services.inference.settings import InferenceSettings
from services.trainer.server import build_server as build_trainer
from services.trainer.settings import TrainerSettings
from tunedock.client import InferenceClient, RegistryClient, TrainerClient
from tunedock.v1 import adapter_registry_pb2 as rpb
from tunedock.v1 import adapter_registry_pb2_grpc

MIB = 1024 * 1024


@pytest.fixture
def registry(tmp_path):
    settings = RegistrySettings(
        port=0,
        metrics_port=-1,
        data_dir=tmp_path,
        max_message_mb=1,
        max_artifact_mb=2,
        max_streams_per_principal=2,
        upload_timeout_s=1.5,
    )
    server = ServerThread(lambda: build_registry(settings))
    yield server
    server.stop()


def nothing_stored(server: ServerThread, data_dir) -> None:
    with RegistryClient(server.address) as client:
        assert list(client.list_artifacts()) == []
    assert list((data_dir / "registry" / "staging").iterdir()) == []


def manifest(name: str, data: bytes) -> rpb.PublishRequest:
    files = [
        rpb.FileEntry(path="config.json", size=2, sha256=hashlib.sha256(b"{}").hexdigest()),
        rpb.FileEntry(path="model.safetensors", size=len(data), sha256=hashlib.sha256(data).hexdigest()),
    ]
    return rpb.PublishRequest(manifest=rpb.Manifest(name=name, kind=rpb.ARTIFACT_KIND_MODEL, files=files))


def test_oversized_message_is_resource_exhausted(registry, tmp_path):
    data = b"x" * (MIB + 1024)
    chunk = rpb.PublishRequest(chunk=rpb.FileChunk(path="model.safetensors", offset=0, data=data))
    with grpc.insecure_channel(registry.address) as channel:
        stub = adapter_registry_pb2_grpc.AdapterRegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Publish(iter([manifest("big-message", data), chunk]), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    nothing_stored(registry, tmp_path)


def test_oversized_artifact_is_refused_before_any_byte(registry, tmp_path):
    data = b"y" * (3 * MIB)
    with grpc.insecure_channel(registry.address) as channel:
        stub = adapter_registry_pb2_grpc.AdapterRegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Publish(iter([manifest("big-artifact", data)]), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the artifact is 3.0 MiB; the limit is 2 MiB" in info.value.details()
    nothing_stored(registry, tmp_path)


def test_streams_per_caller_are_capped(registry):
    with grpc.insecure_channel(registry.address) as channel:
        stub = adapter_registry_pb2_grpc.AdapterRegistryServiceStub(channel)
        open_streams = [stub.Watch(rpb.WatchRequest(), timeout=30) for _ in range(2)]
        time.sleep(0.5)  # both are being served
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Watch(rpb.WatchRequest(), timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already has 2 open streams" in info.value.details()
        open_streams[0].cancel()
        time.sleep(0.5)
        again = stub.Watch(rpb.WatchRequest(), timeout=1)
        with pytest.raises(grpc.RpcError) as info:
            next(again)  # admitted: it waits for events until its own deadline
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for stream in open_streams[1:]:
            stream.cancel()


def test_server_side_deadline_stops_a_stalled_upload(registry, tmp_path):
    data = b"z" * 1000

    def slow():
        yield manifest("stalled", data)
        time.sleep(3)  # past the server's 1.5 s deadline
        yield rpb.PublishRequest(chunk=rpb.FileChunk(path="model.safetensors", offset=0, data=data))

    with grpc.insecure_channel(registry.address) as channel:
        stub = adapter_registry_pb2_grpc.AdapterRegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Publish(slow(), timeout=30)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "1.5s deadline" in info.value.details()
    time.sleep(0.5)
    nothing_stored(registry, tmp_path)


def test_oversized_dataset_is_refused_and_not_stored(tmp_path):
    registry = ServerThread(lambda: build_registry(RegistrySettings(port=0, metrics_port=-1, data_dir=tmp_path)))
    settings = TrainerSettings(
        port=0, worker_port=0, metrics_port=-1, data_dir=tmp_path, max_dataset_mb=1, registry_address=registry.address
    )
    trainer = ServerThread(lambda: build_trainer(settings))
    try:
        line = b'{"text": "' + b"w" * 1000 + b'"}\n'
        path = tmp_path / "big.jsonl"
        path.write_bytes(line * (2 * MIB // len(line)))
        with TrainerClient(trainer.address) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.upload_dataset(path)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 1 MiB" in info.value.details() and "--max-dataset-mb" in info.value.details()
            assert list(client.list_datasets()) == []
        assert list((tmp_path / "trainer" / "datasets").rglob("*.*")) == []
        assert list((tmp_path / "trainer" / "staging").iterdir()) == []
    finally:
        trainer.stop(grace=0.5)
        registry.stop()


def test_prompt_length_and_max_tokens_caps(tmp_path, tiny_model_dir, inference_stack):
    settings = InferenceSettings(
        port=0,
        metrics_port=-1,
        data_dir=tmp_path,
        base_model=str(tiny_model_dir),
        registry_address=inference_stack.registry.address,
        max_model_len=512,
        max_tokens_limit=8,
        max_prompt_chars=100,
    )
    server = ServerThread(
        lambda: build_inference(settings, engine=inference_stack.engine), loop=inference_stack.inference.loop
    )
    try:
        with InferenceClient(server.address) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.generate("a" * 101, max_tokens=4)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "prompt is 101 characters; the limit is 100" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                client.generate("hello", max_tokens=9)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_tokens must be in 1..8, got 9" in info.value.details()
            assert client.generate("hello", max_tokens=8).completions[0].token_ids
    finally:
        server.stop()
