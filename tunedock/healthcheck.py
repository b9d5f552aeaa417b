"""`python -m tunedock.healthcheck [ADDRESS]`: exit 0 when the gRPC health service says SERVING.

The containers' HEALTHCHECK (Kubernetes uses its native gRPC probes instead). The address
defaults to $TUNEDOCK_HEALTH_ADDRESS, else 127.0.0.1:50051; no heavy imports.
"""

from __future__ import annotations

import os
import sys

from tunedock.local_stack import check_health


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    address = args[0] if args else os.environ.get("TUNEDOCK_HEALTH_ADDRESS", "127.0.0.1:50051")
    status = check_health(address, timeout=3.0)
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
