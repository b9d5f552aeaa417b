"""The contracts: generated stubs are fresh, protos lint clean, every RPC is present."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_stale_stub_is_detected(tmp_path):
    """The freshness check can fail: a copy of the tree with one edited stub is reported."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    shutil.copytree(ROOT / "tunedock" / "v1", copy / "tunedock" / "v1")
    stub = copy / "tunedock" / "v1" / "common_pb2.pyi"
    stub.write_text(stub.read_text() + "\n# hand edit\n")
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=copy, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "common_pb2.pyi" in result.stdout


def test_every_designed_rpc_exists():
    from tunedock.v1 import adapter_registry_pb2, inference_pb2, trainer_pb2

    def rpcs(module, service):
        return {m.name for m in module.DESCRIPTOR.services_by_name[service].methods}

    assert {
        "UploadDataset",
        "GetDataset",
        "ListDatasets",
        "SubmitJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
    } <= rpcs(trainer_pb2, "TrainerService")
    assert {"GetAssignment", "ReportEvent"} <= rpcs(trainer_pb2, "TrainerWorkerService")
    assert {
        "Publish",
        "GetVersion",
        "Resolve",
        "ListArtifacts",
        "ListVersions",
        "Download",
        "SetAlias",
        "DeleteAlias",
        "DeleteVersion",
        "Watch",
    } <= rpcs(adapter_registry_pb2, "AdapterRegistryService")
    assert {"Generate", "GenerateUnary", "PreloadAdapter", "UnloadAdapter", "ListLoadedAdapters"} <= rpcs(
        inference_pb2, "InferenceService"
    )


def test_method_config_oneof_covers_the_four_methods():
    from tunedock.v1 import common_pb2

    oneof = common_pb2.MethodConfig.DESCRIPTOR.oneofs_by_name["config"]
    assert [f.name for f in oneof.fields] == ["full", "freeze", "lora", "qlora"]
    freeze = {f.name for f in common_pb2.FreezeConfig.DESCRIPTOR.fields}
    assert {"trainable_layers", "trainable_layer_indices", "trainable_modules", "extra_modules"} <= freeze
    lora = {f.name for f in common_pb2.LoraConfig.DESCRIPTOR.fields}
    assert {"r", "alpha", "dropout", "target_modules", "use_rslora"} <= lora
    qlora = {f.name for f in common_pb2.QLoraConfig.DESCRIPTOR.fields}
    assert {"lora", "quant_type", "double_quant", "compute_dtype", "paged_optimizer"} <= qlora


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx (Node.js) is not installed; buf runs through npm")
def test_buf_lint_is_clean():
    result = subprocess.run(
        ["npx", "--yes", "@bufbuild/buf@1.75.0", "lint"],
        cwd=ROOT / "protos",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
