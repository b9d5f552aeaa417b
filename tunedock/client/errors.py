"""gRPC statuses back into TuneDock's errors: the one place the SDK translates them.

Every SDK client's stub is wrapped (`translating`): a failed call raises the `tunedock.errors`
class of its status (`NotFound`, `Unavailable`, ...) carrying the server's message. The raised
object is also a `grpc.RpcError` with `code()` and `details()`, so code written against plain
gRPC keeps working; code that needs no grpc (service cores, the worker) catches the domain class.
"""

from __future__ import annotations

import grpc

from tunedock import errors

_BY_STATUS: dict[str, type[errors.TuneDockError]] = {
    cls.status: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.TuneDockError) and cls.__bases__ == (errors.TuneDockError,)
}
SERVER_ANSWERED = "grpc-retry-pushback-ms"
"""Trailing metadata a TuneDock server sets on its own UNAVAILABLE answers (services/common/interceptors.py)."""
_RPC_CLASSES: dict[type, type] = {}


def _rpc_class(domain: type[errors.TuneDockError]) -> type:
    """`domain` that is also a grpc.RpcError (one class per domain class, made once)."""
    if domain not in _RPC_CLASSES:

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self.message

        _RPC_CLASSES[domain] = type(domain.__name__, (domain, grpc.RpcError), {"code": code, "details": details})
    return _RPC_CLASSES[domain]


def from_rpc_error(exc: grpc.RpcError) -> errors.TuneDockError:
    """The TuneDock error for a failed call (its status class, the server's message)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if callable(getattr(exc, "details", None)) else "") or code.name
    domain = _BY_STATUS.get(code.name, errors.TuneDockError)
    if domain is errors.Unavailable and not _server_answered(exc):
        domain = errors.Unreachable
    translated = _rpc_class(domain)(details)
    translated._code = code
    if domain is errors.TuneDockError:
        translated.status = code.name
    return translated


def _server_answered(exc: grpc.RpcError) -> bool:
    trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    return any(key == SERVER_ANSWERED for key, _ in trailing or ())


class _Stream:
    """A streaming call whose iteration raises TuneDock errors; everything else (cancel, ...) passes through."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class _TranslatedMethod:
    """A stub method whose direct calls raise TuneDock errors; `future`, `with_call`, ... pass through."""

    def __init__(self, method) -> None:
        self._method = method
        self._streams = isinstance(method, grpc.UnaryStreamMultiCallable | grpc.StreamStreamMultiCallable)

    def __call__(self, *args, **kwargs):
        try:
            result = self._method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _Stream(result) if self._streams else result

    def __getattr__(self, name: str):
        return getattr(self._method, name)


class translating:
    """A stub whose calls raise TuneDock errors."""

    def __init__(self, stub) -> None:
        self._stub = stub

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)
        wrapped = _TranslatedMethod(method)
        setattr(self, name, wrapped)
        return wrapped
