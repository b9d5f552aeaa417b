"""TuneDock's errors as OpenAI's HTTP errors: the one place an HTTP front maps domain errors.

The status is the HTTP twin of the gRPC status the gRPC fronts send for the same error
(ErrorMappingInterceptor), so a client sees the same failure either way; the body is OpenAI's
`{"error": {"message", "type", "param", "code"}}`, which the OpenAI SDKs turn into their typed
exceptions (BadRequestError, AuthenticationError, NotFoundError, ...).
"""

from __future__ import annotations

from tunedock import errors

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    501: "not_implemented",
    503: "service_unavailable",
    504: "timeout",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPE.get(status, "internal_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def from_domain(exc: errors.TuneDockError) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) of a domain error."""
    status = HTTP_STATUS.get(exc.status, 500)
    code = exc.status.lower()
    if status == 404:
        code = "model_not_found" if "adapter" in exc.message or "model" in exc.message else "not_found"
    return status, error_body(status, exc.message, getattr(exc, "param", None), code)
