"""TuneDock's errors, one per gRPC status, with no grpc in sight.

Both sides speak them. Service cores raise them and never import grpc: the servers'
`ErrorMappingInterceptor` turns each into its status, with the message sent as-is (so it
must say what is wrong and what to fix); anything that is not a `TuneDockError` becomes
INTERNAL with the traceback logged and never sent. The SDK turns a status it receives back
into the same class (`tunedock.client.errors`), once, so callers (the CLI, a service calling
the registry, a training worker) catch `NotFound` or `Unavailable` rather than grpc codes.
"""

from __future__ import annotations


class TuneDockError(Exception):
    """Base class. `status` names the gRPC status code (grpc.StatusCode member name)."""

    status = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TuneDockError):
    """The request itself is malformed: a field is missing, out of range or unparseable."""

    status = "INVALID_ARGUMENT"


class NotFound(TuneDockError):
    """The named item does not exist (or the caller may not see it)."""

    status = "NOT_FOUND"


class AlreadyExists(TuneDockError):
    """The item to create exists already."""

    status = "ALREADY_EXISTS"


class FailedPrecondition(TuneDockError):
    """The request is well formed but the system is not in a state to accept it."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(TuneDockError):
    """A size, rate or capacity limit was hit."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(TuneDockError):
    """A dependency (registry, engine, database) cannot be reached right now; retry later."""

    status = "UNAVAILABLE"


class Unreachable(Unavailable):
    """No TuneDock server answered: nothing listens at the address, DNS failed, or a proxy had no backend.

    Raised by the SDK only (a server that answers UNAVAILABLE itself marks its answer, see
    `tunedock.client.errors`), so callers can tell "start the service" from "the service says a
    dependency is down" by class.
    """


class Aborted(TuneDockError):
    """A concurrent change won; the client may retry."""

    status = "ABORTED"


class PermissionDenied(TuneDockError):
    """The caller is known but lacks the role for this call."""

    status = "PERMISSION_DENIED"


class Unauthenticated(TuneDockError):
    """No valid credentials came with the call."""

    status = "UNAUTHENTICATED"


class DataLoss(TuneDockError):
    """Stored bytes do not match their checksum."""

    status = "DATA_LOSS"


class DeadlineExceeded(TuneDockError):
    """The server stopped working on a call that ran past its server-side deadline."""

    status = "DEADLINE_EXCEEDED"
