"""The SDK's channel balances across every address a target resolves to (what a headless Service gives)."""

from __future__ import annotations

import json

from services.adapter_registry.server import build_server
from services.adapter_registry.settings import RegistrySettings
from services.common.server_thread import ServerThread
from tunedock.client import RegistryClient
from tunedock.client.channel import _SERVICE_CONFIG


def test_service_config_asks_for_round_robin():
    assert json.loads(_SERVICE_CONFIG)["loadBalancingConfig"] == [{"round_robin": {}}]


def test_calls_spread_over_all_resolved_addresses(tmp_path):
    # Two registry replicas on one port, at two loopback addresses: the target resolves to
    # both, as dns:///tunedock-registry:50052 resolves to every ready pod of a headless Service.
    first = ServerThread(
        lambda: build_server(RegistrySettings(host="127.0.0.1", port=0, metrics_port=-1, data_dir=tmp_path / "a"))
    )
    port = first.server.port
    second = ServerThread(
        lambda: build_server(RegistrySettings(host="127.0.0.2", port=port, metrics_port=-1, data_dir=tmp_path / "b"))
    )
    try:
        with RegistryClient(f"ipv4:127.0.0.1:{port},127.0.0.2:{port}") as client:
            for _ in range(20):
                assert list(client.list_artifacts()) == []
        served = [
            sum(v for (_, method, _), v in _counts(s.server).items() if method == "ListArtifacts")
            for s in (first, second)
        ]
        assert sum(served) == 20 and min(served) >= 5, served
    finally:
        second.stop()
        first.stop()


def _counts(server) -> dict:
    samples = {}
    for metric in server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "tunedock_rpc_requests_total":
                labels = sample.labels
                samples[(labels["service"], labels["method"], labels["code"])] = sample.value
    return samples
