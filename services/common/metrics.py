"""Prometheus metrics on a side HTTP port, one registry per server.

A registry per server (not the process-global one) lets tests run several servers in
one process without colliding metric names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class ServerMetrics:
    """Per-RPC metrics every server exports; services add their own to `registry`."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "tunedock_rpc_requests",
            "Finished RPCs by service, method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tunedock_rpc_latency_seconds",
            "RPC latency (streams: until the stream ends).",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tunedock_rpc_in_flight",
            "RPCs in progress.",
            ["service", "method"],
            registry=self.registry,
        )

    def serve_http(self, host: str, port: int):
        """Start /metrics on host:port (0 = free port); returns (server, actual_port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
