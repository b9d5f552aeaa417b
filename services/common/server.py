"""One way to build and run a TuneDock gRPC server.

`GrpcServer` wires a service's servicers into a `grpc.aio` server with the shared
interceptors, the standard health service (one status per service), reflection and a
Prometheus side port. `run_service` is what every `python -m services.X` calls: it
parses settings (clear one-line errors), configures JSON logging, serves until SIGTERM
or SIGINT, then shuts down gracefully: health flips to NOT_SERVING first (so load
balancers drain), in-flight RPCs get `shutdown_grace_s` to finish, the rest are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.auth import Authenticator, TokenFile, WorkerTokens
from services.common.interceptors import AuthInterceptor, ErrorMappingInterceptor, ObservabilityInterceptor
from services.common.logging import configure_logging
from services.common.metrics import ServerMetrics
from services.common.settings import ServerSettings
from tunedock.client.channel import read_token
from tunedock.errors import TuneDockError
from tunedock.tokenfile import load_key

log = logging.getLogger(__name__)


@dataclass
class ServiceBinding:
    """A servicer and how to add it: `add(servicer, server)` is the generated `add_XServicer_to_server`."""

    full_name: str
    servicer: Any
    add: Callable[[Any, aio.Server], None]
    listener: str = "main"
    """Which port serves it: "main" (settings.port) or a name in `GrpcServer.listener_ports`."""


@dataclass
class GrpcServer:
    """A gRPC server for one TuneDock service; `start()` then `stop()`."""

    settings: ServerSettings
    bindings: Sequence[ServiceBinding]
    on_stop: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    after_start: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)

    listener_ports: dict[str, int] = field(default_factory=dict)
    """Extra ports for bindings that must be reachable apart (e.g. the trainer's worker API)."""
    roles: dict[str, str | None] = field(default_factory=dict)
    """Full method name -> the role a caller needs (None: any authenticated caller)."""

    port: int = 0
    metrics_port: int | None = None
    http_port: int | None = None
    """The service's HTTP API port where it serves one (inference's OpenAI-compatible API), else None."""
    core: Any = None
    """The service's core, for callers in the same process (tests, benchmarks)."""

    def __post_init__(self) -> None:
        self.health = HealthServicer()
        self.exit_code = 0
        self.stop_requested = asyncio.Event()
        """Set by a signal, or by `fail()` when the service cannot go on (run_service then stops it)."""
        self._server: aio.Server | None = None
        self._extra: dict[str, aio.Server] = {}
        self.bound: dict[str, int] = {}
        self._metrics_http = None
        self._tasks: list[asyncio.Task] = []
        self.authenticator = build_authenticator(self.settings)
        self.auth = AuthInterceptor(
            self.authenticator,
            self.roles,
            max_streams=self.settings.max_streams_per_principal,
            rpc_timeout_s=self.settings.rpc_timeout_s,
            upload_timeout_s=self.settings.upload_timeout_s,
        )

    @property
    def address(self) -> str:
        return self.address_of("main")

    def address_of(self, listener: str) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host
        return f"{host}:{self.port if listener == 'main' else self.bound[listener]}"

    def _new_server(self, bindings: list[ServiceBinding], port: int) -> tuple[aio.Server, int]:
        max_bytes = self.settings.max_message_mb * 1024 * 1024
        server = aio.server(
            interceptors=[ObservabilityInterceptor(self.metrics), ErrorMappingInterceptor(), self.auth],
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        for binding in bindings:
            binding.add(binding.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [b.full_name for b in bindings]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        credentials = server_credentials(self.settings)
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
        if bound == 0:
            raise TuneDockError(f"could not bind {host}:{port}: is the port in use?")
        return server, bound

    async def start(self) -> GrpcServer:
        names = [b.full_name for b in self.bindings]
        server, self.port = self._new_server([b for b in self.bindings if b.listener == "main"], self.settings.port)
        for listener, port in self.listener_ports.items():
            extra, self.bound[listener] = self._new_server([b for b in self.bindings if b.listener == listener], port)
            await extra.start()
            self._extra[listener] = extra
        await server.start()
        self._server = server
        if self.settings.metrics_port >= 0:
            token_file = self.settings.metrics_token_file
            scraper = read_token(token_file) or ""
            if token_file and not scraper:
                raise TuneDockError(f"{token_file} (metrics_token_file) is empty: put the scraper's token in it")
            self._metrics_http, self.metrics_port = self.metrics.serve_http(
                self.settings.metrics_host or self.settings.host, self.settings.metrics_port, scraper
            )
        for callback in self.after_start:
            result = callback()
            if asyncio.iscoroutine(result):
                await result
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.authenticator is None:
            if self.settings.insecure:
                log.warning(
                    "authentication is OFF on %s (--insecure): anyone who can reach it can do anything", self.address
                )
            else:
                log.info("authentication is off (no --token-file): serving loopback only")
        log.info(
            "serving %s on %s",
            ", ".join(names),
            self.address,
            extra={
                "grpc_port": self.port,
                "metrics_port": self.metrics_port,
                "http_port": self.http_port,
                "listener_ports": self.bound,
            },
        )
        return self

    async def set_serving(self, serving: bool) -> None:
        """Health of the server and every service it binds (load balancers and probes read it)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *(b.full_name for b in self.bindings)]:
            await self.health.set(name, status)

    def supervise(self, name: str, run: Callable[[], Awaitable[None]], restart_s: float = 1.0) -> None:
        """Run a long-lived task while the server runs: an exception is logged with its traceback, counted
        (tunedock_background_errors_total{task=name}) and the task started again; stop() cancels it."""

        async def supervised() -> None:
            while True:
                try:
                    await run()
                    return
                except Exception:
                    log.exception("background task %s failed; starting it again in %.0f s", name, restart_s)
                    self.metrics.background_errors.labels(name).inc()
                    await asyncio.sleep(restart_s)

        self._tasks.append(asyncio.get_running_loop().create_task(supervised(), name=name))

    def fail(self, reason: str) -> None:
        """Stop serving and exit non-zero (the process supervisor, e.g. Kubernetes, restarts it)."""
        log.error("cannot go on: %s", reason)
        self.exit_code = 1
        self.stop_requested.set()

    async def stop(self, grace: float | None = None) -> None:
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        await asyncio.gather(self._server.stop(grace), *(s.stop(grace) for s in self._extra.values()))
        self._server = None
        self._extra.clear()
        for callback in self.on_stop:
            result = callback()
            if asyncio.iscoroutine(result):
                await result
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def build_authenticator(settings: ServerSettings) -> Authenticator | None:
    """Token file (+ worker tokens where the service has a worker key); None when authentication is off."""
    if not settings.token_file:
        return None
    key_file = getattr(settings, "worker_key_file", "")
    workers = WorkerTokens(load_key(Path(key_file))) if key_file else None
    return Authenticator(TokenFile(Path(settings.token_file)), workers)


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


BuildServer = Callable[[Any], Awaitable[GrpcServer]]


def run_service(settings_cls: type[ServerSettings], build: BuildServer, argv: list[str] | None = None) -> int:
    """Entry point body of `python -m services.X`: settings, logging, serve until a signal."""
    try:
        settings = settings_cls.load(sys.argv[1:] if argv is None else argv)
    except TuneDockError as exc:
        print(f"{settings_cls.SERVICE_NAME}: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings_cls.SERVICE_NAME, settings.log_level)
    try:
        return asyncio.run(_serve(settings, build))
    except TuneDockError as exc:
        log.error("cannot start: %s", exc.message)
        return 1


async def _serve(settings: ServerSettings, build: BuildServer) -> int:
    server = await build(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop_requested.set)
    await server.start()
    await server.stop_requested.wait()
    log.info("stopping; draining for up to %.1fs", settings.shutdown_grace_s)
    await server.stop()
    return server.exit_code
