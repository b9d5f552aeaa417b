"""`python -m tunedock.healthcheck [ADDRESS]`: exit 0 when the gRPC health service says SERVING.

The containers' HEALTHCHECK, and the Kubernetes probe when TLS is on (native gRPC probes
speak plaintext only). The address defaults to $TUNEDOCK_HEALTH_ADDRESS, else
127.0.0.1:50051; TLS comes from TUNEDOCK_TLS_* like every other client. No heavy imports.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tunedock.client.channel import connect


def check_health(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The standard health check of `service` ("" = the whole server): the status name, or UNREACHABLE."""
    with connect(address, token=None) as channel:  # health needs no token
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    address = args[0] if args else os.environ.get("TUNEDOCK_HEALTH_ADDRESS", "127.0.0.1:50051")
    status = check_health(address)
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
