"""Registry fixtures: one conformance suite over every storage backend, through a real gRPC server.

Backends: SQLite + local directory (always), SQLite + S3 (a moto S3 server started here),
PostgreSQL + local directory (needs TUNEDOCK_TEST_POSTGRES_URL pointing at a server whose
user may create databases; `.ci/run` starts one and sets TUNEDOCK_REQUIRE_POSTGRES=1, which
turns the skip into a failure).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.adapter_registry.server import build_server
from services.adapter_registry.settings import RegistrySettings
from services.common.server_thread import ServerThread
from tests.postgres import postgres_database
from tunedock.client import RegistryClient


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class RegistryBackend:
    """Storage settings for one backend; `start()` gives a running server over them (restartable)."""

    name: str
    data_dir: Path
    database_url: str = ""
    blob_url: str = ""
    s3_endpoint_url: str = ""
    max_artifact_mb: int = 64

    def settings(self) -> RegistrySettings:
        return RegistrySettings(
            port=0,
            metrics_port=-1,
            data_dir=self.data_dir,
            database_url=self.database_url,
            blob_url=self.blob_url,
            s3_endpoint_url=self.s3_endpoint_url,
            max_artifact_mb=self.max_artifact_mb,
        )

    def start(self) -> ServerThread:
        settings = self.settings()
        return ServerThread(lambda: build_server(settings))


@pytest.fixture(params=["sqlite+dir", "sqlite+s3", pytest.param("postgres+dir", marks=pytest.mark.postgres)])
def backend(request, tmp_path) -> RegistryBackend:
    if request.param == "sqlite+dir":
        yield RegistryBackend("sqlite+dir", tmp_path)
    elif request.param == "sqlite+s3":
        import boto3

        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"tunedock-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield RegistryBackend("sqlite+s3", tmp_path, blob_url=f"s3://{bucket}/blobs", s3_endpoint_url=endpoint)
    else:
        url, drop = postgres_database()
        yield RegistryBackend("postgres+dir", tmp_path, database_url=url)
        drop()


@pytest.fixture
def server(backend):
    thread = backend.start()
    yield thread
    thread.stop()


@pytest.fixture
def client(server):
    with RegistryClient(server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def adapter_template(tiny_model_dir, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter (r=4, q/v projections) for the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def adapter_dir(adapter_template, tmp_path) -> Path:
    """A private, editable copy of the template adapter."""
    target = tmp_path / f"adapter-{uuid.uuid4().hex[:6]}"
    shutil.copytree(adapter_template, target)
    return target
