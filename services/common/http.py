"""What every OpenAI-compatible HTTP front of a service shares: callers, errors, metrics, the server.

Inference serves /v1/models and generation, the trainer /v1/files and /v1/fine_tuning; both
authenticate the same bearer tokens as gRPC (an OpenAI SDK's `api_key` is a TuneDock token),
refuse in OpenAI's error shape with the HTTP twin of the gRPC status, count requests in the
service's metrics, and run uvicorn on the service's own event loop (the cores are bound to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.auth import ANONYMOUS, Authenticator, Principal
from services.common.interceptors import bearer_token
from services.common.openai_errors import error_body, from_domain
from tunedock import errors

log = logging.getLogger(__name__)

HOW_TO_SEND = "send the header 'Authorization: Bearer <token>' (the OpenAI SDKs send their api_key so)"


class HttpError(Exception):
    """A refusal of a front itself (body not JSON, a field the protocol models reject)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def authenticate(request: Request, authenticator: Authenticator | None, role: str | None) -> Principal:
    """The caller of `request` (ANONYMOUS with authentication off), checked for `role` when given."""
    if authenticator is None:
        return ANONYMOUS
    token = bearer_token([(k, v) for k, v in request.headers.items()], "header", HOW_TO_SEND)
    found = authenticator.authenticate(token)
    if found is None:
        raise errors.Unauthenticated(
            "the bearer token is unknown, revoked or expired: ask for a new one (tunedock tokens create)"
        )
    if role is not None and not found.has_role(role):
        raise errors.PermissionDenied(f"{found.name} lacks the role {role} needed for {request.url.path}")
    return found


class Observe:
    """Counts and times every request (pure ASGI: no wrapping of streamed bodies, unlike BaseHTTPMiddleware)."""

    def __init__(self, app, metrics, route: Callable[[str], str]) -> None:
        self.app, self.metrics, self.route = app, metrics, route

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = self.route(scope.get("path", ""))  # ids folded: bounded label values
            self.metrics.requests.labels("openai", route, str(status[0])).inc()
            self.metrics.latency.labels("openai", route).observe(time.perf_counter() - started)


def openai_app(title: str, metrics, route: Callable[[str], str], serves: str) -> FastAPI:
    """A FastAPI app whose every refusal is OpenAI-shaped; `serves` completes "this server serves ..."."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Observe, metrics=metrics, route=route)

    @app.exception_handler(errors.TuneDockError)
    async def domain_error(request: Request, exc: errors.TuneDockError):
        status, body = from_domain(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HttpError)
    async def front_error(request: Request, exc: HttpError):
        return JSONResponse(error_body(exc.status, exc.message, exc.param), status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        request_id = uuid.uuid4().hex[:16]
        log.error("unhandled error in %s (request id %s)", request.url.path, request_id, exc_info=exc)
        message = f"internal error (request id {request_id}); see server log"
        return JSONResponse(error_body(500, message), status_code=500)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        detail = getattr(exc, "detail", None)
        if isinstance(detail, str) and detail != "Not Found":  # an HTTPException raised with its own message
            return JSONResponse(error_body(404, detail), status_code=404)
        message = f"no route {request.method} {request.url.path}: this server serves {serves}"
        return JSONResponse(error_body(404, message), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return JSONResponse(error_body(405, f"{request.method} is not allowed on {request.url.path}"), status_code=405)

    return app


class HttpServer:
    """uvicorn on the service's event loop (the core is bound to it), started after the gRPC server."""

    def __init__(self, app: FastAPI, host: str, port: int, tls_cert_file: str = "", tls_key_file: str = "") -> None:
        import uvicorn

        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_config=None,  # the service's own logging (JSON lines)
            ssl_certfile=tls_cert_file or None,
            ssl_keyfile=tls_key_file or None,
            timeout_keep_alive=30,
        )
        self.server = uvicorn.Server(self.config)
        self.task: asyncio.Task | None = None

    async def start(self) -> int:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it could not start
                raise errors.TuneDockError(f"the HTTP API could not bind port {self.config.port}: is it in use?")
            await asyncio.sleep(0.01)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"})
FORWARDED_METHODS = ["GET", "POST", "DELETE"]


def forward(app: FastAPI, prefixes: tuple[str, ...], target: str, what: str) -> None:
    """Serve `prefixes` of another service's HTTP front (at `target`) on this app's port, bodies streamed
    both ways: the one base URL a local stack gives clients (in Kubernetes the proxy routes by path
    and nothing is forwarded)."""
    import httpx
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    client = httpx.AsyncClient(base_url=target.rstrip("/"), timeout=httpx.Timeout(600.0, connect=10.0))

    async def relay(request: Request) -> StreamingResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        upstream = client.build_request(
            request.method, request.url.path, params=request.query_params, headers=headers, content=request.stream()
        )
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.TransportError as exc:
            raise errors.Unavailable(
                f"{what} at {target} is unreachable ({type(exc).__name__}): is it running?"
            ) from None
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(
            answer.aiter_raw(), status_code=answer.status_code, headers=kept, background=BackgroundTask(answer.aclose)
        )

    for prefix in prefixes:
        app.add_api_route(prefix, relay, methods=FORWARDED_METHODS, include_in_schema=False)
        app.add_api_route(prefix + "/{rest:path}", relay, methods=FORWARDED_METHODS, include_in_schema=False)
