"""Channels with TuneDock's defaults: retries on UNAVAILABLE, large messages, round-robin over DNS."""

from __future__ import annotations

import json

import grpc

MAX_MESSAGE = 64 * 1024 * 1024

# Unary calls retry on UNAVAILABLE with backoff (streams are retried by the callers that can resume).
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def connect(address: str) -> grpc.Channel:
    """An insecure channel to `address` ('host:port' or 'dns:///svc:port' to balance across replicas)."""
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
