"""Channels with TuneDock's defaults: retries on UNAVAILABLE, large messages, round-robin over DNS,
the caller's bearer token on every call, and TLS (with a client certificate for mTLS) when asked.

Credentials come from the arguments, else the environment, so the CLI, the SDK, services
calling the registry and training workers all configure the same way:

- token: `TUNEDOCK_TOKEN`, else the file named by `TUNEDOCK_TOKEN_FILE`, else
  `$TUNEDOCK_HOME/token` (written by `tunedock up` for the local stack), else none;
- TLS: `TUNEDOCK_TLS_CA_FILE` (turns TLS on; the CA that signed the servers),
  `TUNEDOCK_TLS_CERT_FILE` + `TUNEDOCK_TLS_KEY_FILE` (client certificate for mTLS),
  `TUNEDOCK_TLS_SERVER_NAME` (when the address is not a name in the certificate).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from tunedock.client.errors import translating

MAX_MESSAGE = 64 * 1024 * 1024

# Unary calls retry on UNAVAILABLE with backoff (streams are retried by the callers that can resume).
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                # Transport failures only: a server that answers UNAVAILABLE itself sends a
                # negative retry pushback, so its answer reaches the caller at once. Three tries
                # within ~0.3 s: a call answers or fails UNAVAILABLE well within 2 s.
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


@dataclass(frozen=True)
class TlsFiles:
    """Client-side TLS: the CA to trust, and optionally a client certificate (mTLS)."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    @classmethod
    def from_env(cls) -> TlsFiles | None:
        ca = os.environ.get("TUNEDOCK_TLS_CA_FILE", "")
        if not ca:
            return None
        return cls(
            ca,
            os.environ.get("TUNEDOCK_TLS_CERT_FILE", ""),
            os.environ.get("TUNEDOCK_TLS_KEY_FILE", ""),
            os.environ.get("TUNEDOCK_TLS_SERVER_NAME", ""),
        )

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


def read_token(path: str | os.PathLike | None) -> str | None:
    """The token in a file (surrounding whitespace dropped), or None for no path."""
    return Path(path).read_text().strip() if path else None


def default_token() -> str | None:
    if os.environ.get("TUNEDOCK_TOKEN"):
        return os.environ["TUNEDOCK_TOKEN"]
    if os.environ.get("TUNEDOCK_TOKEN_FILE"):
        return read_token(os.environ["TUNEDOCK_TOKEN_FILE"])
    home = Path(os.environ.get("TUNEDOCK_HOME", Path.home() / ".tunedock")).expanduser()
    return read_token(home / "token") if (home / "token").is_file() else None


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call (works on plaintext loopback too)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


FROM_ENV: object = object()  # "take it from the environment"


def connect(
    address: str, token: str | object | None = FROM_ENV, tls: TlsFiles | object | None = FROM_ENV
) -> grpc.Channel:
    """A channel to `address` ('host:port', or 'dns:///svc:port' to balance across replicas).

    `token` and `tls` default to the environment (see the module doc); pass None for none.
    """
    token = default_token() if token is FROM_ENV else token
    tls = TlsFiles.from_env() if tls is FROM_ENV else tls
    assert token is None or isinstance(token, str)
    assert tls is None or isinstance(tls, TlsFiles)
    options = [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # Reconnect within about a second once a server is back (gRPC's default backoff grows to
        # 120 s, which kept a replica's registry channel down for seconds after an outage).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if tls is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


class ServiceClient:
    """What every SDK client shares: a channel (made here, or given), a stub, a default timeout, `with`."""

    STUB: type
    """The generated stub class of the service."""
    DEFAULT_TIMEOUT = 60.0

    def __init__(
        self,
        address: str | grpc.Channel,
        timeout: float | None = None,
        token: str | object | None = FROM_ENV,
        tls: TlsFiles | object | None = FROM_ENV,
    ) -> None:
        """`token`/`tls` default to the environment (TUNEDOCK_TOKEN, TUNEDOCK_TLS_CA_FILE, ...)."""
        self.channel = connect(address, token, tls) if isinstance(address, str) else address
        self.stub = translating(self.STUB(self.channel))
        """Calls raise `tunedock.errors` classes (also grpc.RpcError), see tunedock.client.errors."""
        self.timeout = self.DEFAULT_TIMEOUT if timeout is None else timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pages(call: Callable, request, items: str, timeout: float | None) -> Iterator:
    """Every item of a paged list RPC: `call(request)` again with each next_page_token until there is none.

    `items` names the reply's repeated field ("jobs", "versions", ...); `request` is copied, not changed.
    """
    request = type(request).FromString(request.SerializeToString())
    while True:
        page = call(request, timeout=timeout)
        yield from getattr(page, items)
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token
