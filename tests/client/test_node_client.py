"""clients/node/example.mjs, run with Node.js against the real stack: a client built from protos/ alone.

The trainer runs as its own process (the session's `stack_env`), inference is the session's engine.
The example trains on the trainer's default base (it sends no base_model), so this also checks that
what a job without a base produces is served by the stack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tunedock.client import RegistryClient

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"


@pytest.fixture(scope="module")
def node_client():
    npm, node = shutil.which("npm"), shutil.which("node")
    assert npm and node, "Node.js and npm are needed to run clients/node (.ci/run has them)"
    if not all((NODE_CLIENT / "node_modules" / p).exists() for p in ("@grpc/grpc-js", "openai")):
        subprocess.run([npm, "ci", "--silent", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, check=True, timeout=300)
    return node


def test_the_node_example_trains_on_the_default_base_and_generates_with_the_adapter(
    node_client, stack_env, tiny_model_dir
):
    env = {**stack_env, "TUNEDOCK_EXAMPLE_OUTPUT": "node-example"}
    run = subprocess.run(
        [node_client, "example.mjs"], cwd=NODE_CLIENT, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # The trainer's default base is the base inference serves; the job took it and said so.
    assert result["default_base_model"] == result["served_base"] == str(tiny_model_dir)
    assert result["job"]["base_model"] == str(tiny_model_dir) and result["job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert result["states"][0]["message"].startswith("no base_model given: training on this trainer's default base")
    assert result["job"]["step"] == "12"  # int64 as a string (longs: String): exact, not a float
    assert "progress" in result["events"] and "published" in result["events"]
    assert result["dataset"] == {"id": result["dataset"]["id"], "num_records": "8", "format": "DATASET_FORMAT_CHAT"}
    # max_tokens (snake_case, kept by keepCase) was honoured: 8 tokens, not the default 64.
    assert len(result["unary"]["token_ids"]) == 8
    assert result["unary"]["adapter_version"] == result["job"]["output_ref"]
    # Streaming and unary greedy decoding agree.
    assert result["streamed"]["text"] == result["unary"]["text"] and result["streamed"]["messages"] >= 2
    assert result["streamed"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert result["error"]["name"] == "NOT_FOUND" and "node-example-missing" in result["error"]["details"]
    with RegistryClient(stack_env["TUNEDOCK_REGISTRY_ADDRESS"]) as registry:
        lineage = registry.get(result["job"]["output_ref"]).lineage
    assert lineage.base_model == str(tiny_model_dir)


def test_the_openai_npm_package_streams_a_chat_with_an_adapter(node_client, inference_stack, tiny_model_dir, tmp_path):
    """clients/node/openai_chat.mjs: the stock `openai` package for Node against the OpenAI-compatible API."""
    import openai

    from tests.inference.test_inference_service import _train_adapter
    from tunedock.client import RegistryClient

    with RegistryClient(inference_stack.registry.address) as registry:
        registry.publish_dir(_train_adapter(tiny_model_dir, tmp_path, seed=11), "node-oai")
    env = {**os.environ, "TUNEDOCK_OPENAI_BASE_URL": inference_stack.openai_base_url, "TUNEDOCK_MAX_TOKENS": "12"}

    def run(model: str) -> dict:
        done = subprocess.run(
            [node_client, "openai_chat.mjs", model],
            cwd=NODE_CLIENT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    streamed = run("node-oai")
    with openai.OpenAI(base_url=inference_stack.openai_base_url, api_key="none", max_retries=0) as client:
        whole = client.chat.completions.create(
            model="node-oai",
            messages=[{"role": "user", "content": "What does the pirate say about ship 3?"}],
            max_tokens=12,
            temperature=0,
        )
    assert streamed["text"] == whole.choices[0].message.content and streamed["chunks"] > 2
    assert streamed["finish"] == "length" and streamed["usage"]["completion_tokens"] == 12
    missing = run("node-oai-missing")
    assert missing["error"]["name"] == "NotFoundError" and missing["error"]["status"] == 404
