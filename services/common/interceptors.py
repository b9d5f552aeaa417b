"""Server interceptors: domain-error mapping and per-RPC observability.

Both wrap every handler kind (unary/stream in and out) through `wrap_handler`, so the
servicers stay thin: they convert protos, call a core, and let exceptions fly.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from services.common.auth import ANONYMOUS, Principal, current_principal
from services.common.disk import full_disk, is_full
from services.common.logging import request_id
from services.common.metrics import ServerMetrics
from tunedock import errors

log = logging.getLogger(__name__)


def wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary: Callable, wrap_stream: Callable) -> grpc.RpcMethodHandler:
    """Rebuild `handler` with its behavior wrapped: `wrap_unary` for unary responses,
    `wrap_stream` for streaming responses. Serializers are kept."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_unary),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_stream),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_unary),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_stream),
    )
    for attr, build, wrap in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return build(
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


async def _call(behavior: Callable, request: Any, context: aio.ServicerContext) -> Any:
    """Call a unary-response behavior, sync or async."""
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _iterate(behavior: Callable, request: Any, context: aio.ServicerContext):
    """Iterate a streaming-response behavior, async generator or sync generator."""
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif result is not None:
        for item in result:
            yield item


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """The one place that turns exceptions into gRPC statuses.

    `TuneDockError` subclasses carry their status and a client-facing message;
    `NotImplementedError` becomes UNIMPLEMENTED; anything else is INTERNAL, with the
    traceback logged here and a generic message (with the request id) sent.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap_unary(behavior):
            async def wrapped(request, context):
                try:
                    return await _call(behavior, request, context)
                except Exception as exc:
                    await self._abort(exc, context, method)

            return wrapped

        def wrap_stream(behavior):
            async def wrapped(request, context):
                try:
                    async for item in _iterate(behavior, request, context):
                        yield item
                except Exception as exc:
                    await self._abort(exc, context, method)

            return wrapped

        return wrap_handler(handler, wrap_unary, wrap_stream)

    @staticmethod
    async def _abort(exc: Exception, context: aio.ServicerContext, method: str) -> None:
        if isinstance(exc, aio.AbortError):
            raise exc  # the servicer aborted deliberately: status already set
        if isinstance(exc, errors.TuneDockError):
            if exc.status == "UNAVAILABLE":
                # The server answered: retrying at once would get the same answer. A negative pushback
                # tells gRPC's client retry policy not to retry (it still retries transport failures).
                context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
            await context.abort(getattr(grpc.StatusCode, exc.status), exc.message)
        if isinstance(exc, NotImplementedError):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
        if is_full(exc):  # a write no code path wrapped: still a status that says what to do
            log.error("disk full in %s", method, exc_info=exc)
            where = getattr(exc, "filename", None) or "the service's data directory"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, full_disk(f"for {method}", where).message)
        log.error("unhandled error in %s", method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {request_id.get() or 'unknown'}); see server log"
        )


class ObservabilityInterceptor(aio.ServerInterceptor):
    """Request ids, one log line per finished RPC, Prometheus counters and latency histograms.

    Sits outside `ErrorMappingInterceptor`, so the status it records is the final one.
    The request id comes from the `x-request-id` metadata key when the client sends one
    and is echoed back in the initial metadata.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method.startswith("/grpc.health.") or method.startswith("/grpc.reflection."):
            return handler  # probes would drown the request log
        incoming = dict(handler_call_details.invocation_metadata or ())
        service, _, rpc = method.strip("/").rpartition("/")

        def start(context) -> tuple[contextvars.Token, float]:
            rid = incoming.get("x-request-id") or uuid.uuid4().hex[:16]
            token = request_id.set(rid)
            self.metrics.in_flight.labels(service, rpc).inc()
            return token, time.perf_counter()

        def finish(context, token, started: float, exc: BaseException | None) -> None:
            code = _final_code(context, exc)
            elapsed = time.perf_counter() - started
            self.metrics.in_flight.labels(service, rpc).dec()
            self.metrics.requests.labels(service, rpc, code).inc()
            self.metrics.latency.labels(service, rpc).observe(elapsed)
            log.info("rpc %s %s", method, code, extra={"rpc": method, "code": code, "ms": round(elapsed * 1e3, 2)})
            request_id.reset(token)

        def wrap_unary(behavior):
            async def wrapped(request, context):
                token, started = start(context)
                exc = None
                try:
                    return await _call(behavior, request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    finish(context, token, started, exc)

            return wrapped

        def wrap_stream(behavior):
            async def wrapped(request, context):
                token, started = start(context)
                exc = None
                try:
                    async for item in _iterate(behavior, request, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    finish(context, token, started, exc)

            return wrapped

        return wrap_handler(handler, wrap_unary, wrap_stream)


def _final_code(context: aio.ServicerContext, exc: BaseException | None) -> str:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    if exc is None:
        return "OK"
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        return "CANCELLED"
    return "UNKNOWN"


OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes carry no token


HOW_TO_SEND = (
    "send the metadata 'authorization: Bearer <token>' (the CLI and SDK read TUNEDOCK_TOKEN or TUNEDOCK_TOKEN_FILE)"
)


def bearer_token(metadata, what: str = "metadata", how: str = HOW_TO_SEND) -> str:
    """The token of an `authorization: Bearer <token>` header; UNAUTHENTICATED saying what is wrong with it.

    `what` names where it travels ("metadata" in gRPC, "header" in HTTP) and `how` how to send it."""
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if not values:
        raise errors.Unauthenticated(f"no credentials: the call has no 'authorization' {what}; {how}")
    if len(values) > 1:
        raise errors.Unauthenticated(f"{len(values)} 'authorization' {what} entries; send one: {how}")
    header = values[0]  # grpc hands text headers over as str (only "-bin" keys are bytes)
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        if not header.strip():
            problem = "it is empty"
        elif not token:  # one word: the token itself, most likely (not echoed: it may be a secret)
            problem = "it holds one word with no 'Bearer ' prefix: send 'Bearer ' followed by the token"
        else:
            problem = f"its scheme is {scheme[:20]!r}, not Bearer"
        raise errors.Unauthenticated(f"the 'authorization' {what} must be 'Bearer <token>': {problem}")
    if not token.strip():
        raise errors.Unauthenticated(f"the 'authorization' {what} says 'Bearer' but carries no token after it")
    return token.strip()


class AuthInterceptor(aio.ServerInterceptor):
    """Authenticates each call, checks the role its method needs, and applies per-caller limits.

    - `authorization: Bearer <token>` metadata -> a principal (UNAUTHENTICATED when missing
      or unknown); the method's role from `roles` (PERMISSION_DENIED naming the role when
      the principal lacks it; methods missing from `roles` are denied). With no
      authenticator (authentication off) every call is `ANONYMOUS`.
    - The principal is set in `current_principal` for the servicer and core.
    - At most `max_streams` streaming calls per principal at once (RESOURCE_EXHAUSTED);
      unary calls are cut off after `rpc_timeout_s`, uploads (client streams) after
      `upload_timeout_s` (DEADLINE_EXCEEDED).

    Sits inside `ErrorMappingInterceptor`, which turns its domain errors into statuses.
    """

    def __init__(
        self,
        authenticator,
        roles: dict[str, str | None],
        max_streams: int = 128,
        rpc_timeout_s: float = 600.0,
        upload_timeout_s: float = 21600.0,
    ) -> None:
        self.authenticator = authenticator
        self.roles = roles
        self.max_streams = max_streams
        self.rpc_timeout_s = rpc_timeout_s
        self.upload_timeout_s = upload_timeout_s
        self.streams: dict[str, int] = {}

    def _principal(self, method: str, metadata) -> Principal:
        if self.authenticator is None:
            return ANONYMOUS
        found = self.authenticator.authenticate(bearer_token(metadata))
        if found is None:
            raise errors.Unauthenticated(
                "the bearer token is unknown, revoked or expired: ask for a new one (tunedock tokens create)"
            )
        if method in self.roles:
            role = self.roles[method]
        elif method.startswith("/grpc.reflection."):
            role = None  # any authenticated caller may list the API
        else:
            raise errors.PermissionDenied(f"no role grants {method}")
        if role is not None and not found.has_role(role):
            raise errors.PermissionDenied(f"{found.name} lacks the role {role} needed for {method.rpartition('/')[2]}")
        return found

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS):
            return handler
        metadata = handler_call_details.invocation_metadata
        deadline = self.upload_timeout_s if handler.request_streaming else self.rpc_timeout_s

        def wrap_unary(behavior):
            async def wrapped(request, context):
                token = current_principal.set(self._principal(method, metadata))
                try:
                    # asyncio.timeout runs the call in this task; wait_for would start a task per call.
                    async with asyncio.timeout(deadline):
                        return await _call(behavior, request, context)
                except TimeoutError:
                    raise errors.DeadlineExceeded(
                        f"the server stopped this call after its {deadline:g}s deadline"
                    ) from None
                finally:
                    current_principal.reset(token)

            return wrapped

        def wrap_stream(behavior):
            async def wrapped(request, context):
                caller = self._principal(method, metadata)
                if self.streams.get(caller.name, 0) >= self.max_streams:
                    raise errors.ResourceExhausted(
                        f"{caller.name} already has {self.max_streams} open streams; close some and retry"
                    )
                self.streams[caller.name] = self.streams.get(caller.name, 0) + 1
                token = current_principal.set(caller)
                try:
                    async for item in _iterate(behavior, request, context):
                        yield item
                finally:
                    self.streams[caller.name] -= 1
                    with contextlib.suppress(ValueError):  # closed from another context
                        current_principal.reset(token)

            return wrapped

        return wrap_handler(handler, wrap_unary, wrap_stream)
