"""Shared fixtures: the tiny model (built once per machine, cached) and one vLLM engine per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The session's fine-tuning stack and its four trained jobs (Python client, Node client and console tests).
pytest_plugins = ["tests.support.fine_tuning"]

# vLLM's CPU backend sizes its KV cache from NUMA node memory (~9 GiB here): give it a fixed,
# small one so engines fit beside the test process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No model hub here (nor in CI): `datasets` (lm-eval's local tasks) must not try to reach it.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config) -> list[str]:
    from tests.common.fuzz_seed import describe

    return [describe()]


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that touches the session's vLLM engine is marked `vllm` (for `make test-fast`)."""
    for item in items:
        if "inference_stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)


ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("TUNEDOCK_TEST_MODEL_CACHE", Path.home() / ".cache" / "tunedock-test-models"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tunedock.tiny_model import build_tiny_model

    return build_tiny_model(cache_dir=MODEL_CACHE)


MAX_LORAS = 3


class InferenceStack:
    """A registry and an inference server (with its own vLLM engine) on port 0; `inference_stack` is the session's."""

    MAX_LORAS = MAX_LORAS
    max_lora_rank = 128  # an adapter extracted at full rank (128 on the tiny model's k/v projections) is served

    def __init__(self, data_dir: Path, base: Path, max_loras: int = MAX_LORAS, **extra) -> None:
        from services.adapter_registry.server import build_server as build_registry
        from services.adapter_registry.settings import RegistrySettings
        from services.common.server_thread import ServerThread
        from services.inference.server import build_server as build_inference
        from services.inference.settings import InferenceSettings

        self.data_dir = data_dir
        self.base = base
        self.registry_settings = RegistrySettings(port=0, metrics_port=-1, data_dir=data_dir)
        self.registry = ServerThread(lambda: build_registry(self.registry_settings))
        settings = InferenceSettings(
            port=0,
            metrics_port=0,
            data_dir=data_dir,
            base_model=str(base),
            registry_address=self.registry.address,
            max_loras=max_loras,
            max_cpu_loras=8,
            max_lora_rank=self.max_lora_rank,
            max_model_len=512,
            dtype="float32",
            resolve_ttl_s=30.0,
            http_port=0,  # the OpenAI-compatible API beside gRPC, as `tunedock up` serves it
            **extra,
        )
        self.inference = ServerThread(lambda: build_inference(settings))

    @property
    def engine(self):
        return self.inference.server.core.engine

    @property
    def openai_base_url(self) -> str:
        """The replica's OpenAI-compatible API, as clients are given it (`.../v1`)."""
        return f"http://127.0.0.1:{self.inference.server.http_port}/v1"

    def restart_registry(self) -> None:
        """Start the registry again on the same port and data (after `registry.stop()`)."""
        from services.adapter_registry.server import build_server as build_registry
        from services.common.server_thread import ServerThread

        self.registry_settings.port = int(self.registry.address.rsplit(":", 1)[1])
        self.registry = ServerThread(lambda: build_registry(self.registry_settings))

    def engine_tokens(self, prompt: str, lora_request=None, max_tokens: int = 12) -> list[int]:
        """Greedy tokens straight from the engine (no gRPC service in between)."""
        import uuid

        async def run():
            tokens = []
            sampling = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
            async for out in self.engine.generate(prompt, sampling, uuid.uuid4().hex, lora_request):
                tokens.extend(out.outputs[0].token_ids)
            return tokens

        return self.inference.run(run())

    def stop(self) -> None:
        self.inference.stop()
        self.registry.stop()
        self.engine.shutdown()


@pytest.fixture(scope="session")
def inference_stack(tiny_model_dir, tmp_path_factory):
    """The session's one vLLM engine (start-up ~20-40 s), behind a real inference gRPC server."""
    stack = InferenceStack(tmp_path_factory.mktemp("inference"), tiny_model_dir)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def stack_env(inference_stack, tmp_path_factory):
    """The trainer runs as its own process, as in production: the test process hosts the vLLM engine, which
    puts tcmalloc into LD_PRELOAD, and workers started from here would inherit it (and its memory profile)."""
    clean = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    data_dir = tmp_path_factory.mktemp("cli-trainer")
    with (data_dir / "trainer.log").open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.trainer",
                "--port",
                "0",
                "--worker-port",
                "0",
                "--metrics-port",
                "-1",
                "--data-dir",
                str(data_dir),
                "--registry-address",
                inference_stack.registry.address,
                "--max-lora-rank",
                str(inference_stack.max_lora_rank),
                "--default-base-model",  # jobs without a base train on the one inference serves
                str(inference_stack.base),
            ],
            cwd=ROOT,
            env=clean,
            stderr=log,
        )
    address = _wait_for_port(data_dir / "trainer.log", proc)
    yield {
        **clean,
        "TUNEDOCK_TRAINER_ADDRESS": address,
        "TUNEDOCK_REGISTRY_ADDRESS": inference_stack.registry.address,
        "TUNEDOCK_INFERENCE_ADDRESS": inference_stack.inference.address,
        "COLUMNS": "200",
    }
    proc.terminate()
    proc.wait(30)


def _wait_for_port(log_path: Path, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_text().splitlines():
            if '"grpc_port"' in line:
                return f"127.0.0.1:{json.loads(line)['grpc_port']}"
        time.sleep(0.2)
    raise AssertionError(f"trainer did not start: {log_path.read_text()[-2000:]}")


@pytest.fixture
def small_disk(tmp_path):
    """A real 20 MiB filesystem (tmpfs) for disk-full tests; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk-full tests need root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
