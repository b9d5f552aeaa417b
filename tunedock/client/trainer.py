"""Trainer SDK: upload datasets, submit/get/list/cancel jobs, watch their events."""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tunedock.client.channel import ServiceClient, pages
from tunedock.v1 import trainer_pb2 as pb
from tunedock.v1 import trainer_pb2_grpc

CHUNK = 1024 * 1024
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


class TrainerClient(ServiceClient):
    STUB = trainer_pb2_grpc.TrainerServiceStub

    def upload_dataset(
        self,
        path: Path | str,
        name: str = "",
        project: str = "",
        *,
        dataset: str = "",
        split: str = "",
        progress: Callable[[int, int], None] | None = None,
    ) -> pb.Dataset:
        """Upload a dataset and return it stored (validated); every record is checked by the trainer.

        `path` is a file (JSONL, JSON array, Parquet, CSV/TSV, Arrow) or a folder (a `datasets`
        save_to_disk directory, a folder of shards, a LLaMA-Factory data folder: `dataset` names
        the entry of its dataset_info.json, `split` a DatasetDict's split), sent as a tar archive.
        `progress(sent, total)` is called after each chunk, in bytes.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(_packed(path) if path.is_dir() else path.open("rb"))
            total = os.fstat(source.fileno()).st_size
            header = pb.DatasetHeader(name=name or path.name, project=project, dataset=dataset, split=split)

            def stream():
                yield pb.UploadDatasetRequest(header=header)
                sent = 0
                while block := source.read(CHUNK):
                    yield pb.UploadDatasetRequest(data=block)
                    sent += len(block)
                    if progress is not None:
                        progress(sent, total)

            return self.stub.UploadDataset(stream(), timeout=self.timeout * 10).dataset

    def info(self) -> pb.GetTrainerInfoResponse:
        """What this trainer offers: default base model, devices, executor, limits (any token may ask)."""
        return self.stub.GetTrainerInfo(pb.GetTrainerInfoRequest(), timeout=self.timeout)

    def get_dataset(self, dataset_id: str) -> pb.Dataset:
        return self.stub.GetDataset(pb.GetDatasetRequest(id=dataset_id), timeout=self.timeout).dataset

    def list_datasets(self, project: str = "", page_size: int = 0) -> Iterator[pb.Dataset]:
        request = pb.ListDatasetsRequest(page_size=page_size, project=project)
        return pages(self.stub.ListDatasets, request, "datasets", self.timeout)

    def delete_dataset(self, dataset_id: str) -> pb.Dataset:
        """Delete a dataset (refused while a job that has not ended uses it); returns it as it was."""
        return self.stub.DeleteDataset(pb.DeleteDatasetRequest(id=dataset_id), timeout=self.timeout).dataset

    def submit(self, spec: pb.JobSpec) -> pb.Job:
        return self.stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=self.timeout).job

    def extract(
        self,
        source: str,
        output_name: str,
        *,
        rank: int = 0,
        energy: float = 0.0,
        max_rank: int = 0,
        base_model: str = "",
        allow_dropped: bool = False,
        max_dropped_share: float = 0.0,
        eval_dataset_ids: list[str] | None = None,
        labels: dict[str, str] | None = None,
        project: str = "",
    ) -> pb.Job:
        """Submit an extraction: a Full or Freeze result (`source`, "name:version" or "name@alias") becomes a
        LoRA adapter published as `output_name`. rank=0 picks the smallest rank keeping `energy` (default
        0.9) of the change; zero values mean the documented defaults (see ExtractSpec)."""
        from tunedock.v1 import common_pb2

        spec = pb.JobSpec(
            base_model=base_model,
            output_name=output_name,
            project=project,
            eval_dataset_ids=eval_dataset_ids or [],
            labels=[common_pb2.Label(key=k, value=v) for k, v in (labels or {}).items()],
            extract=pb.ExtractSpec(
                source=source,
                rank=rank,
                energy=energy,
                max_rank=max_rank,
                allow_dropped=allow_dropped,
                max_dropped_share=max_dropped_share,
            ),
        )
        return self.submit(spec)

    def get(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=self.timeout).job

    def list(
        self, state: pb.JobState = pb.JOB_STATE_UNSPECIFIED, page_size: int = 0, project: str = ""
    ) -> Iterator[pb.Job]:
        request = pb.ListJobsRequest(state=state, page_size=page_size, project=project)
        return pages(self.stub.ListJobs, request, "jobs", self.timeout)

    def cancel(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=self.timeout).job

    def watch(self, job_id: str, after_sequence: int = 0, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """Every event of the job, past then live, until it ends."""
        for reply in self.stub.WatchJob(pb.WatchJobRequest(id=job_id, after_sequence=after_sequence), timeout=timeout):
            yield reply.event

    def wait(self, job_id: str, timeout: float = 3600) -> pb.Job:
        for _ in self.watch(job_id, timeout=timeout):
            pass
        return self.get(job_id)


@contextlib.contextmanager
def _packed(folder: Path) -> Iterator:
    """A folder as an uncompressed tar archive in a temporary file (data files rarely compress
    enough to pay for it; the trainer unpacks it with tarfile's `data` filter)."""
    with tempfile.TemporaryFile() as archive:
        with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for item in sorted(folder.rglob("*")):
                if item.is_file() and not item.is_symlink() and not item.name.startswith("."):
                    tar.add(item, arcname=str(item.relative_to(folder)), recursive=False)
        archive.seek(0)
        yield archive
