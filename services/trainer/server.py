"""Wires the trainer core, its stores, executor and servicers into a server."""

from __future__ import annotations

import asyncio

from prometheus_client import Gauge

from services.common.auth import method_roles
from services.common.blobs import LocalBlobStore
from services.common.http import HttpServer
from services.common.server import GrpcServer, ServiceBinding
from services.trainer.core import TrainerCore
from services.trainer.executor import LocalExecutor
from services.trainer.openai_api import FineTuningFront, build_app
from services.trainer.servicer import TrainerServicer, TrainerWorkerServicer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore
from tunedock.client.channel import read_token
from tunedock.v1 import trainer_pb2, trainer_pb2_grpc

ROLES: dict[str, str | None] = {
    "GetTrainerInfo": None,  # any authenticated caller
    "UploadDataset": "trainer.submit",
    "DeleteDataset": "trainer.submit",
    "SubmitJob": "trainer.submit",
    "CancelJob": "trainer.submit",
    "GetDataset": "trainer.read",
    "ListDatasets": "trainer.read",
    "GetJob": "trainer.read",
    "ListJobs": "trainer.read",
    "WatchJob": "trainer.read",
    "GetAssignment": "trainer.worker",
    "ReportEvent": "trainer.worker",
    "DownloadDataset": "trainer.worker",
    "Heartbeat": "trainer.worker",
}


def build_executor(settings: TrainerSettings, worker_address, core: TrainerCore):
    if settings.executor == "kubernetes":
        from services.trainer.kube import KubernetesExecutor, settings_from

        return KubernetesExecutor(settings_from(settings), core.worker_exited, poll_s=settings.k8s_poll_s)
    gpus = None if settings.gpus == "auto" else [g for g in settings.gpus.split(",") if g and settings.gpus != "none"]
    return LocalExecutor(
        worker_address,
        settings.data_dir / "trainer" / "logs",
        core.worker_exited,
        gpus=gpus,
        gpus_per_process=settings.gpus_per_process,
    )


async def build_server(settings: TrainerSettings) -> GrpcServer:
    store = await asyncio.to_thread(JobStore, settings.database_url)
    core = TrainerCore(
        store,
        LocalBlobStore(settings.data_dir / "trainer" / "datasets"),
        executor=None,
        max_concurrent=settings.max_concurrent_jobs,
        max_attempts=settings.max_attempts,
        checkpoints_kept=settings.checkpoints_kept,
        max_dataset_bytes=settings.max_dataset_mb * 1024 * 1024,
        data_dir=settings.data_dir,
        registry_address=settings.registry_address,
        registry_token=read_token(settings.registry_token_file),
        worker_token_ttl_s=settings.worker_token_ttl_s,
        max_lora_rank=settings.max_lora_rank,
        default_base_model=settings.default_base_model,
    )
    services = trainer_pb2.DESCRIPTOR.services_by_name
    server = GrpcServer(
        settings,
        [
            ServiceBinding(
                services["TrainerService"].full_name,
                TrainerServicer(core),
                trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
            ),
            ServiceBinding(
                services["TrainerWorkerService"].full_name,
                TrainerWorkerServicer(core),
                trainer_pb2_grpc.add_TrainerWorkerServiceServicer_to_server,
                listener="worker",
            ),
        ],
        listener_ports={"worker": settings.worker_port},
        roles=method_roles(services["TrainerService"], ROLES) | method_roles(services["TrainerWorkerService"], ROLES),
    )
    # The key that verifies worker tokens here also mints them (None with authentication off).
    core.worker_tokens = server.authenticator.workers if server.authenticator else None
    # Workers report back to the worker port, whose number is known once the server has
    # started: the executors read it lazily.
    core.executor = build_executor(settings, lambda: server.address_of("worker"), core)
    core.set_serving = server.set_serving
    core.background_failed = lambda task: server.metrics.background_errors.labels(task).inc()
    if isinstance(core.executor, LocalExecutor):
        core.executor.on_monitor_error = server.metrics.background_errors.labels("worker-monitor").inc
    Gauge(
        "tunedock_trainer_checkpoint_bytes",
        "Bytes jobs' checkpoints hold (succeeded jobs keep checkpoints_kept of them).",
        registry=server.metrics.registry,
    ).set_function(core.checkpoint_bytes)
    server.after_start.append(core.recover)
    if settings.http_port >= 0:
        http = HttpServer(
            build_app(FineTuningFront(core, server.authenticator, server.metrics)),
            settings.host,
            settings.http_port,
            settings.tls_cert_file,
            settings.tls_key_file,
        )

        async def start_http() -> None:
            server.http_port = await http.start()

        server.after_start.append(start_http)
        server.on_stop.insert(0, http.stop)
    server.on_stop.insert(0, core.executor.close)
    server.on_stop.append(core.previewer.close)
    server.on_stop.append(store.close)
    return server
