"""gRPC servicers of the trainer: proto in, core call, proto out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

from grpc import aio

from services.common.protoconv import enum_name, enum_number, from_proto, to_proto
from services.trainer.core import TrainerCore
from services.trainer.data.sources import SourceOptions
from services.trainer.domain import JobEvent, JobSpec
from services.trainer.store import DatasetRow, JobRecord
from tunedock import __version__
from tunedock.errors import InvalidArgument
from tunedock.v1 import common_pb2, trainer_pb2_grpc
from tunedock.v1 import trainer_pb2 as pb

STATES = pb.JobState.DESCRIPTOR
FORMATS = pb.DatasetFormat.DESCRIPTOR


def job_to_proto(job: JobRecord) -> pb.Job:
    msg = pb.Job(
        id=job.id,
        spec=to_proto(job.spec, pb.JobSpec()),
        state=cast(pb.JobState, enum_number(STATES, job.state)),
        error=job.error,
        step=job.step,
        total_steps=job.total_steps,
        attempt=job.attempt,
        failures=job.failures,
        output_ref=job.output_ref,
        metrics=[common_pb2.Metric(name=k, value=v) for k, v in sorted(job.metrics.items())],
    )
    msg.create_time.FromDatetime(job.created_at)
    if job.started_at:
        msg.start_time.FromDatetime(job.started_at)
    if job.ended_at:
        msg.end_time.FromDatetime(job.ended_at)
    return msg


def dataset_to_proto(row: DatasetRow) -> pb.Dataset:
    msg = pb.Dataset(
        id=row.id,
        name=row.name,
        format=cast(pb.DatasetFormat, enum_number(FORMATS, row.format)),
        num_records=row.num_records,
        size=row.size,
        sha256=row.sha256,
        project=row.project,
        ignored_columns=row.ignored_columns or [],
        stats=pb.DatasetStats(**row.stats) if row.stats else None,
    )
    msg.create_time.FromDatetime(row.created_at)
    return msg


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: aio.ServicerContext
    ) -> pb.UploadDatasetResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("the first message of an UploadDataset stream must be the header")
        fmt = enum_name(FORMATS, first.header.format, "header.format")
        options = SourceOptions(dataset=first.header.dataset, split=first.header.split)
        upload = self.core.begin_upload(first.header.name, fmt, first.header.project, options)
        try:
            async for request in request_iterator:
                upload.write(request.data)
            row = await asyncio.to_thread(upload.finish)
        finally:
            upload.close()
        return pb.UploadDatasetResponse(dataset=dataset_to_proto(row))

    async def GetDataset(self, request: pb.GetDatasetRequest, context: aio.ServicerContext) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(
            dataset=dataset_to_proto(await asyncio.to_thread(self.core.get_dataset, request.id))
        )

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        page = await asyncio.to_thread(self.core.list_datasets, request.page_size, request.page_token, request.project)
        return pb.ListDatasetsResponse(
            datasets=[dataset_to_proto(r) for r in page.items], next_page_token=page.next_token
        )

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: aio.ServicerContext
    ) -> pb.DeleteDatasetResponse:
        row = await asyncio.to_thread(self.core.delete_dataset, request.id)
        return pb.DeleteDatasetResponse(dataset=dataset_to_proto(row))

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: aio.ServicerContext) -> pb.SubmitJobResponse:
        job = await self.core.submit(from_proto(JobSpec, request.spec, "spec."))
        return pb.SubmitJobResponse(job=job_to_proto(job))

    async def GetJob(self, request: pb.GetJobRequest, context: aio.ServicerContext) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=job_to_proto(await asyncio.to_thread(self.core.get_job, request.id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context: aio.ServicerContext) -> pb.ListJobsResponse:
        state = enum_name(STATES, request.state, "state")
        page = await asyncio.to_thread(
            self.core.list_jobs, state, request.page_size, request.page_token, request.project
        )
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in page.items], next_page_token=page.next_token)

    async def CancelJob(self, request: pb.CancelJobRequest, context: aio.ServicerContext) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=job_to_proto(await self.core.cancel(request.id)))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        async for event in self.core.watch(request.id, request.after_sequence):
            yield pb.WatchJobResponse(event=to_proto(event, pb.JobEvent()))

    async def GetTrainerInfo(
        self, request: pb.GetTrainerInfoRequest, context: aio.ServicerContext
    ) -> pb.GetTrainerInfoResponse:
        return pb.GetTrainerInfoResponse(version=__version__, **self.core.info())


class TrainerWorkerServicer(trainer_pb2_grpc.TrainerWorkerServiceServicer):
    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    async def GetAssignment(
        self, request: pb.GetAssignmentRequest, context: aio.ServicerContext
    ) -> pb.GetAssignmentResponse:
        job, checkpoint_dir = await asyncio.to_thread(self.core.assignment, request.job_id)
        return pb.GetAssignmentResponse(
            job=job_to_proto(job), checkpoint_dir=str(checkpoint_dir), registry_address=self.core.registry_address
        )

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: aio.ServicerContext) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(cancel_requested=await self.core.heartbeat(request.job_id, request.attempt))

    async def ReportEvent(self, request: pb.ReportEventRequest, context: aio.ServicerContext) -> pb.ReportEventResponse:
        event = from_proto(JobEvent, request.event, "event.").model_copy(update={"sequence": 0})
        stop = await self.core.report(request.job_id, request.attempt, event)
        return pb.ReportEventResponse(cancel_requested=stop)

    async def DownloadDataset(
        self, request: pb.DownloadDatasetRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadDatasetResponse]:
        chunks = await asyncio.to_thread(self.core.dataset_bytes, request.job_id, request.dataset_id)
        while (data := await asyncio.to_thread(next, chunks, None)) is not None:
            yield pb.DownloadDatasetResponse(data=data)
