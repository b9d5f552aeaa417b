"""Python SDK: typed clients for the TuneDock services."""

from tunedock.client.channel import connect
from tunedock.client.inference import InferenceClient
from tunedock.client.registry import RegistryClient
from tunedock.client.trainer import TrainerClient

__all__ = ["InferenceClient", "RegistryClient", "TrainerClient", "connect"]
