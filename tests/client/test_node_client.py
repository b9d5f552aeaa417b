"""clients/node/example.mjs, run with Node.js against the real stack: a client built from protos/ alone.

The trainer runs as its own process (the session's `stack_env`), inference is the session's engine.
The example trains on the trainer's default base (it sends no base_model), so this also checks that
what a job without a base produces is served by the stack.
"""

from __future__ import annotations

import json
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
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():
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
