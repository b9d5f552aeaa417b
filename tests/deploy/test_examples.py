"""deploy/k8s/examples: the mesh and gateway alternatives to the HAProxy component validate against their CRDs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tunedock.client.inference import ROUTING_KEY

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "k8s" / "examples"
VALIDATOR = EXAMPLES / "validate"


@pytest.fixture(scope="module")
def validate():
    npm = shutil.which("npm")
    assert npm, "npm is needed to validate deploy/k8s/examples against the Istio and Envoy Gateway schemas"
    if not (VALIDATOR / "node_modules").exists():
        subprocess.run([npm, "ci", "--silent", "--no-audit", "--no-fund"], cwd=VALIDATOR, check=True, timeout=300)

    def run(objects: list[dict]) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["node", "validate.mjs"], cwd=VALIDATOR, input=json.dumps(objects), capture_output=True, text=True
        )

    return run


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc]


def test_istio_and_envoy_gateway_examples_validate_and_hash_on_the_sdks_routing_key(validate):
    objects = load("istio-destination-rule.yaml")
    result = validate(objects)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid ") == len(objects) == 3
    kinds = {o["kind"]: o for o in objects}
    hashing = kinds["DestinationRule"]["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]
    assert hashing["httpHeaderName"] == ROUTING_KEY
    assert kinds["DestinationRule"]["spec"]["host"].startswith("tunedock-inference.")
    assert kinds["BackendTrafficPolicy"]["spec"]["loadBalancer"]["consistentHash"]["header"]["name"] == ROUTING_KEY
    (rule,) = kinds["GRPCRoute"]["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "tunedock-inference", "port": 50053}]


def test_the_validator_refuses_a_wrong_example(validate):
    (rule, *_) = load("istio-destination-rule.yaml")
    rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] = 5
    result = validate([rule])
    assert result.returncode == 1 and "httpHeaderName must be string" in result.stdout
