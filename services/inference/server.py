"""Wires the inference servicer into a server."""

from __future__ import annotations

from services.common.server import GrpcServer, ServiceBinding
from services.inference.settings import InferenceSettings
from tunedock.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Generation API (methods answer UNIMPLEMENTED until the inference issue lands)."""


async def build_server(settings: InferenceSettings) -> GrpcServer:
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    return GrpcServer(
        settings,
        [
            ServiceBinding(
                service.full_name, InferenceServicer(), inference_pb2_grpc.add_InferenceServiceServicer_to_server
            )
        ],
    )
