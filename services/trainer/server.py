"""Wires the trainer's servicers into a server."""

from __future__ import annotations

from services.common.server import GrpcServer, ServiceBinding
from services.trainer.settings import TrainerSettings
from tunedock.v1 import trainer_pb2, trainer_pb2_grpc


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Job and dataset API (methods answer UNIMPLEMENTED until the trainer issue lands)."""


class TrainerWorkerServicer(trainer_pb2_grpc.TrainerWorkerServiceServicer):
    """API the training workers report through."""


async def build_server(settings: TrainerSettings) -> GrpcServer:
    services = trainer_pb2.DESCRIPTOR.services_by_name
    return GrpcServer(
        settings,
        [
            ServiceBinding(
                services["TrainerService"].full_name,
                TrainerServicer(),
                trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
            ),
            ServiceBinding(
                services["TrainerWorkerService"].full_name,
                TrainerWorkerServicer(),
                trainer_pb2_grpc.add_TrainerWorkerServiceServicer_to_server,
            ),
        ],
    )
