"""Wires the registry servicer into a server."""

from __future__ import annotations

from services.adapter_registry.settings import RegistrySettings
from services.common.server import GrpcServer, ServiceBinding
from tunedock.v1 import adapter_registry_pb2, adapter_registry_pb2_grpc


class AdapterRegistryServicer(adapter_registry_pb2_grpc.AdapterRegistryServiceServicer):
    """Registry API (methods answer UNIMPLEMENTED until the registry issue lands)."""


async def build_server(settings: RegistrySettings) -> GrpcServer:
    service = adapter_registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistryService"]
    return GrpcServer(
        settings,
        [
            ServiceBinding(
                service.full_name,
                AdapterRegistryServicer(),
                adapter_registry_pb2_grpc.add_AdapterRegistryServiceServicer_to_server,
            )
        ],
    )
