"""Prometheus metrics on a side HTTP port, one registry per server.

A registry per server (not the process-global one) lets tests run several servers in
one process without colliding metric names. With a scraper token (`metrics_token_file`) the
endpoint answers only requests bearing it (Prometheus' `authorization` / a ServiceMonitor's
`bearerTokenSecret`); everyone else gets 401 and no metric names.
"""

from __future__ import annotations

import hmac
import socketserver
import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, start_http_server

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
        self.background_errors = Counter(
            "tunedock_background_errors",
            "Failures of long-lived background tasks (each logged with its traceback; the task carries on).",
            ["task"],
            registry=self.registry,
        )

    def serve_http(self, host: str, port: int, token: str = ""):
        """Start /metrics on host:port (0 = free port), only for `token`'s bearer when given;
        returns (server, actual_port)."""
        if not token:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
            return server, server.server_port
        server = make_server(
            host, port, _scraper_only(make_wsgi_app(self.registry), token), _ThreadingServer, handler_class=_Quiet
        )
        threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
        return server, server.server_port


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


def _scraper_only(app, token: str):
    expected = f"Bearer {token}".encode()

    def guarded(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"metrics need the scraper's bearer token (metrics_token_file)\n"]
        return app(environ, start_response)

    return guarded
