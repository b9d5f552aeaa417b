"""What a service tells its caller when the adapter registry refused the service's own call.

A caller's request (a job naming a source, a generate naming an adapter) makes a service call the
registry with the *service's* token. The registry's answer is about the named item (not found,
malformed, not servable) or about the service itself: a token the registry does not accept is a
misconfiguration of this service, to be fixed by its operator, not an outage to wait out. It
answers FAILED_PRECONDITION at once, naming the registry's status and the setting to fix, and
never UNAVAILABLE (which clients and workers retry).
"""

from __future__ import annotations

from tunedock.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TuneDockError,
    Unauthenticated,
    Unavailable,
)

TOKEN_SETTING = "--registry-token-file (TUNEDOCK_{service}_REGISTRY_TOKEN_FILE)"


def registry_answer(exc: TuneDockError, subject: str, service: str, unavailable: str = "retry later") -> TuneDockError:
    """The error to raise for the registry's `exc` about `subject` (e.g. "adapter 'x@prod'")."""
    for kind in (NotFound, InvalidArgument, FailedPrecondition):
        if isinstance(exc, kind):
            return kind(f"{subject}: {exc.message}")
    if isinstance(exc, Unauthenticated | PermissionDenied):
        setting = TOKEN_SETTING.format(service=service.upper())
        return FailedPrecondition(
            f"the adapter registry refused the {service}'s own credentials ({exc.status}: {exc.message}); "
            f"the operator must give the {service} a valid registry token ({setting}): {subject} cannot be used "
            "until then"
        )
    return Unavailable(f"adapter registry unavailable ({exc.status}): {subject}; {unavailable}")
