"""Shared fixtures: the tiny model (built once per machine, cached) and one vLLM engine per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM's CPU backend sizes its KV cache from NUMA node memory (~9 GiB here): give it a fixed,
# small one so engines fit beside the test process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config) -> list[str]:
    from tests.common.fuzz_seed import describe

    return [describe()]


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that touches the session's vLLM engine is marked `vllm` (for `make test-fast`)."""
    for item in items:
        if "inference_stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)


MODEL_CACHE = Path(os.environ.get("TUNEDOCK_TEST_MODEL_CACHE", Path.home() / ".cache" / "tunedock-test-models"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tunedock.tiny_model import build_tiny_model

    return build_tiny_model(cache_dir=MODEL_CACHE)


MAX_LORAS = 3


class InferenceStack:
    """A registry and an inference server (with its own vLLM engine) on port 0; `inference_stack` is the session's."""

    MAX_LORAS = MAX_LORAS

    def __init__(self, data_dir: Path, base: Path, max_loras: int = MAX_LORAS) -> None:
        from services.adapter_registry.server import build_server as build_registry
        from services.adapter_registry.settings import RegistrySettings
        from services.common.server_thread import ServerThread
        from services.inference.server import build_server as build_inference
        from services.inference.settings import InferenceSettings

        self.data_dir = data_dir
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
            max_lora_rank=16,
            max_model_len=512,
            dtype="float32",
            resolve_ttl_s=30.0,
        )
        self.inference = ServerThread(lambda: build_inference(settings))

    @property
    def engine(self):
        return self.inference.server.core.engine

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
