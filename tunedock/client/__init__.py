"""Python SDK: typed clients for the TuneDock services."""

from tunedock.client.channel import connect
from tunedock.client.registry import RegistryClient

__all__ = ["RegistryClient", "connect"]
