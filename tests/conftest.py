"""Shared fixtures: the tiny model (built once per machine, cached) and one vLLM engine per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM's CPU backend sizes its KV cache from NUMA node memory (~9 GiB here): give it a fixed,
# small one so engines fit beside the test process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_CACHE = Path(os.environ.get("TUNEDOCK_TEST_MODEL_CACHE", Path.home() / ".cache" / "tunedock-test-models"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tunedock.tiny_model import build_tiny_model

    return build_tiny_model(cache_dir=MODEL_CACHE)


@pytest.fixture(scope="session")
def vllm_llm(tiny_model_dir):
    """One offline vLLM engine (LoRA enabled) over the tiny model, shared by the session."""
    from vllm import LLM

    llm = LLM(
        model=str(tiny_model_dir),
        enable_lora=True,
        max_lora_rank=16,
        max_loras=2,
        max_cpu_loras=4,
        dtype="float32",
        max_model_len=512,
        seed=0,
    )
    yield llm
    del llm
