"""The trainer core: datasets, job lifecycle, scheduling, worker reports, watching.

States: validating -> queued -> running -> succeeded | failed | cancelled. Validation
happens inside SubmitJob (a bad spec is refused and never stored). A worker that dies
is retried from its last checkpoint up to `max_attempts`; reports from a superseded
attempt are refused, so a stale worker cannot write over a newer one.

Datasets and jobs belong to a project; the caller (`principal()`, set per RPC) sees and
uses only its projects' items, and anything else answers as missing. With authentication
on, each attempt gets a worker token scoped to its job (`WorkerTokens`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from services.common.audit import audit
from services.common.auth import WorkerTokens, principal
from services.common.basemodels import resolve_local_base
from services.common.blobs import CHUNK, BlobStore
from services.common.changes import Changes
from services.common.disk import close_quietly, disk_errors
from services.common.pages import Page
from services.common.registry_answers import registry_answer
from services.trainer.config import TrainConfig, config_from_spec, extract_options
from services.trainer.data.records import RecordStats, not_a_dataset, validate_records
from services.trainer.data.sources import SourceOptions, detect, is_tar, unpack
from services.trainer.data.stored import stored_records
from services.trainer.domain import JobEvent, JobSpec, State, StateEvent
from services.trainer.executor import EXIT_PLATFORM, Executor, Launch
from services.trainer.previewer import Previewer
from services.trainer.store import TERMINAL, DatasetRow, JobRecord, JobStore, now
from services.trainer.validation import check_against_base, check_same_base
from tunedock import planner
from tunedock.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, TuneDockError
from tunedock.jobs import METHODS
from tunedock.model_files import inspect_base
from tunedock.refs import Ref, check_name
from tunedock.tiny_model import tiny_model_path

log = logging.getLogger(__name__)
NODE_CACHES = ("bases", "datasets", "tokens")
"""Folders beside the jobs' checkpoints that workers share: bases, datasets and tokenized windows."""

MAX_PLATFORM_RETRIES = 10
"""Attempts a job may restart because our infrastructure failed it (beyond max_attempts of its own)."""
DATASET_FORMATS = ("alpaca", "chat", "text")


PREVIEW_MAX_SHOWN = 20
PREVIEW_MAX_SAMPLE = 20_000


def state_event(state: State, message: str = "") -> JobEvent:
    return JobEvent(time=now(), state=StateEvent(state=state, message=message))


class TrainerCore:
    def __init__(
        self,
        store: JobStore,
        datasets: BlobStore,
        executor: Executor | None,
        max_concurrent: int,
        max_attempts: int,
        max_dataset_bytes: int,
        data_dir: Path,
        registry_address: str,
        registry_token: str | None = None,
        worker_tokens: WorkerTokens | None = None,
        worker_token_ttl_s: float = 86400.0,
        max_lora_rank: int = 64,
        default_base_model: str = "",
        checkpoints_kept: int = 0,
    ) -> None:
        self.store = store
        self.datasets = datasets
        self.executor = executor
        self.max_concurrent = max_concurrent
        self.max_attempts = max_attempts
        self.checkpoints_kept = checkpoints_kept
        self.max_dataset_bytes = max_dataset_bytes
        self.data_dir = Path(data_dir)
        self.registry_address = registry_address
        self.registry_token = registry_token
        self.worker_tokens = worker_tokens
        self.worker_token_ttl_s = worker_token_ttl_s
        self.max_lora_rank = max_lora_rank
        self.default_base_model = default_base_model
        """The base of jobs that name none; empty: the embedded tiny model (what inference serves by default)."""
        self.changes = Changes()
        self.set_serving: Callable[[bool], Awaitable[None]] = _serving_unknown
        """Health of the service (the server wires it): NOT_SERVING while the core cannot write its state."""
        self.unwritable_since: float | None = None
        self.previewer = Previewer()
        """Dataset previews tokenize in a helper process (the server never imports the training stack)."""
        self.background_failed: Callable[[str], None] = lambda task: None
        """Counts a background task's failure (the server wires it to tunedock_background_errors_total)."""
        """Wakes WatchJob streams of a job when its events change."""
        self._schedule_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------ datasets

    def begin_upload(
        self, name: str, fmt: str, project: str = "", options: SourceOptions | None = None
    ) -> DatasetUpload:
        """An upload to feed chunk by chunk; `finish` validates and stores it, `close` always."""
        return DatasetUpload(self, name, fmt, project, options or SourceOptions())

    def _store_dataset(self, name: str, fmt: str, path: Path, project: str, options: SourceOptions) -> DatasetRow:
        """Validate an upload record by record (bounded memory whatever its size) and store it: JSONL and
        JSON arrays as sent, every other kind (Parquet, CSV, Arrow, folders) as the JSONL of its records."""
        with disk_errors(f"dataset {name or 'upload'}", path.parent):
            return self._validate_and_store(name, fmt, path, project, options)

    def _validate_and_store(self, name: str, fmt: str, path: Path, project: str, options: SourceOptions) -> DatasetRow:
        project = principal().project_for_write(project)
        source = detect(unpack(path, path.with_suffix(".d")) if is_tar(path) else path, name, options)
        stats = RecordStats(source.kind)
        if source.is_json_text:
            if path.stat().st_size < 16 << 20:  # what a small JSON file that is not a dataset is, said plainly
                why = not_a_dataset(path.read_text(encoding="utf-8-sig", errors="replace"))
                if why:
                    raise InvalidArgument(why)
            found = validate_records(source.records(), fmt, lambda example, _: stats.add(example))
            blob = path
        else:
            blob = path.with_suffix(".jsonl")
            with blob.open("w", encoding="utf-8") as out:

                def keep(example, record) -> None:
                    stats.add(example)
                    out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

                found = validate_records(source.records(), fmt, keep)
        size = blob.stat().st_size
        with blob.open("rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
        self.datasets.put(sha, blob)
        # Content-addressed within a project: the same bytes in two projects are two datasets.
        key = sha if project == "default" else hashlib.sha256(f"{project}\0{sha}".encode()).hexdigest()
        row = DatasetRow(
            id=f"ds-{key[:24]}",
            name=name or "dataset.jsonl",
            format=found.format,
            num_records=found.num_records,
            size=size,
            sha256=sha,
            created_at=now(),
            project=project,
            ignored_columns=list(found.ignored_columns),
            stats=stats.summary(),
        )
        stored = self.store.add_dataset(row)
        audit("trainer.upload_dataset", stored.id, project, sha256=sha, records=stored.num_records)
        return stored

    def get_dataset(self, dataset_id: str) -> DatasetRow:
        row = self.store.get_dataset(dataset_id)
        if not principal().may_access(row.project):
            raise NotFound(f"dataset {dataset_id!r} not found; upload it with `tunedock data upload FILE`")
        return row

    def list_datasets(self, page_size: int, page_token: str, project: str) -> Page[DatasetRow]:
        return self.store.list_datasets(page_size, page_token, principal().readable_projects(project))

    def dataset_content(self, dataset_id: str):
        """The stored bytes of a dataset the caller may read, chunk by chunk (JSONL and JSON arrays as
        uploaded; every other source as the JSONL of its records)."""
        row = self.get_dataset(dataset_id)
        return self.datasets.read(row.sha256, 0, CHUNK)

    def preview_dataset(
        self, dataset_id: str, base_model: str = "", max_length: int = 512, show: int = 3, sample: int = 1000
    ) -> dict:
        """The first `show` records as `base_model` (default: this trainer's) will see them, through its chat
        template with the trained tokens marked, and the token lengths of the first `sample` records
        against `max_length` (a job's max_seq_length): how many a job would cut."""
        if not 1 <= show <= PREVIEW_MAX_SHOWN:
            raise InvalidArgument(f"records must be in [1, {PREVIEW_MAX_SHOWN}], got {show}")
        if not show <= sample <= PREVIEW_MAX_SAMPLE:
            raise InvalidArgument(f"sample must be in [records, {PREVIEW_MAX_SAMPLE}], got {sample}")
        if not 16 <= max_length <= 1 << 17:
            raise InvalidArgument(f"max_length must be in [16, 131072] (a job's max_seq_length), got {max_length}")
        row = self.get_dataset(dataset_id)
        base, local = self._local_base(base_model)
        records = list(itertools.islice(stored_records(self.datasets.read(row.sha256, 0, CHUNK)), sample))
        answer = self.previewer.preview(
            {"records": records, "format": row.format, "base": str(local), "max_length": max_length, "show": show}
        )
        about = {"dataset": row.id, "num_records": row.num_records, "base_model": base, "max_length": max_length}
        return about | answer

    def plan(
        self,
        base_model: str = "",
        batch_size: int = 4,
        max_seq_length: int = 512,
        lora_r: int = 16,
        trainable_layers: int = 2,
        gradient_checkpointing: bool = False,
        device: str = "",
    ) -> dict:
        """Peak training memory of each method on `base_model` (default: this trainer's), as `tunedock plan`
        estimates it, on this trainer's device unless `device` (cpu or cuda) is given."""
        device = device or getattr(self.executor, "device", "cpu")
        for ok, message in (
            (device in ("cpu", "cuda"), f"device must be cpu or cuda, got {device!r}"),
            (1 <= batch_size <= 4096, f"batch_size must be in [1, 4096], got {batch_size}"),
            (16 <= max_seq_length <= 1 << 17, f"max_seq_length must be in [16, 131072], got {max_seq_length}"),
            (1 <= lora_r <= 1024, f"r must be in [1, 1024], got {lora_r}"),
            (1 <= trainable_layers <= 1024, f"trainable_layers must be in [1, 1024], got {trainable_layers}"),
        ):
            if not ok:
                raise InvalidArgument(message)
        base, local = self._local_base(base_model)
        shape = planner.read_shape(local)
        overhead = planner.runtime_overhead(device)
        methods = [
            planner.estimate(
                shape, method, batch_size, max_seq_length, device, lora_r, trainable_layers,
                gradient_checkpointing, overhead,
            ).as_dict()
            for method in METHODS
        ]  # fmt: skip
        return {
            "base_model": base,
            "device": device,
            "batch_size": batch_size,
            "max_seq_length": max_seq_length,
            "methods": methods,
        }

    def _local_base(self, base_model: str) -> tuple[str, Path]:
        """`base_model` (empty: this trainer's default) and its directory here, for previews and plans."""
        base = base_model or self.default_base(build=True)
        local = resolve_local_base(base)
        if local is None:
            raise FailedPrecondition(
                f"base model {base!r} is not on this trainer: give a local model directory, a model in the "
                "trainer's Hugging Face cache, or nothing for the trainer's default base"
            )
        return base, local

    def delete_dataset(self, dataset_id: str) -> DatasetRow:
        """Forget a dataset and free its bytes; refused while a job that has not ended uses it."""
        row = self.get_dataset(dataset_id)
        users = [
            j.id
            for j in self.store.unfinished_jobs()
            if dataset_id in (*j.spec.train_dataset_ids, *j.spec.eval_dataset_ids)
        ]
        if users:
            raise FailedPrecondition(
                f"dataset {dataset_id!r} is used by {', '.join(users)}, which has not ended: cancel it or wait, "
                "then delete the dataset"
            )
        orphaned = self.store.delete_dataset(dataset_id)
        if orphaned is not None:
            self.datasets.delete(orphaned)
        audit("trainer.delete_dataset", dataset_id, row.project, sha256=row.sha256)
        return row

    def get_job(self, job_id: str) -> JobRecord:
        caller = principal()
        caller.check_job(job_id)  # a worker token names its one job
        job = self.store.get_job(job_id)
        if not caller.may_access(job.project):
            raise NotFound(f"job {job_id!r} not found")
        return job

    def job_events(self, job_id: str, before: int = 0, limit: int = 0) -> list[JobEvent]:
        """A job's events: all, oldest first (limit 0), or at most `limit` below sequence `before` (0: the
        newest), newest first."""
        self.get_job(job_id)
        if not limit:
            return self.store.events_after(job_id, 0)
        return self.store.events_before(job_id, before, limit)

    def list_jobs(self, state: str, page_size: int, page_token: str, project: str) -> Page[JobRecord]:
        return self.store.list_jobs(state, page_size, page_token, principal().readable_projects(project))

    def dataset_bytes(self, job_id: str, dataset_id: str):
        spec = self.get_job(job_id).spec
        if dataset_id not in (*spec.train_dataset_ids, *spec.eval_dataset_ids):
            raise NotFound(f"dataset {dataset_id!r} is not used by job {job_id}")
        row = self.store.get_dataset(dataset_id)
        return self.datasets.read(row.sha256, 0, CHUNK)

    # ---------------------------------------------------------------------------------- jobs

    def default_base(self, build: bool = False) -> str:
        """The base a job without base_model trains on; the embedded tiny model is built when `build`."""
        if self.default_base_model:
            return self.default_base_model
        cache = self.data_dir / "models"  # where inference builds it from the same data dir
        path = tiny_model_path(cache_dir=cache)
        if build and not (path / "config.json").exists():
            # In a child process: building needs torch and transformers, which this server never imports.
            done = subprocess.run(
                [sys.executable, "-m", "tunedock.tiny_model", "--cache-dir", str(cache)], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise FailedPrecondition(f"could not build the default base model: {done.stderr.strip()[-500:]}")
        return str(path)

    def validate(self, spec: JobSpec) -> tuple[JobSpec, TrainConfig | None]:
        """The spec as it will run (project, default base, extraction defaults filled in) and, for a
        training job, its TrainConfig; refuses what would fail, saying what to fix."""
        spec = spec.model_copy(update={"project": principal().project_for_write(spec.project)})
        if spec.merge_adapter and spec.extract is not None:
            raise InvalidArgument("a job either merges (merge_adapter) or extracts (extract), not both")
        if spec.merge_adapter:
            self._validate_merge(spec)
            return spec, None
        if spec.extract is not None:
            return self._validate_extract(spec), None
        defaulted = not spec.base_model
        if defaulted:
            spec = spec.model_copy(update={"base_model": self.default_base(build=True)})
        cfg = config_from_spec(spec)
        if not spec.output_name:
            raise InvalidArgument("output_name is required: the registry name the result is published under")
        check_name(spec.output_name)
        if spec.then_extract is not None:
            spec = self._validate_then_extract(spec)
        for dataset_id in (*cfg.dataset_ids, *cfg.eval_dataset_ids):
            if self.get_dataset(dataset_id).project != spec.project:
                raise FailedPrecondition(f"dataset {dataset_id!r} belongs to another project than the job's")
        gpus = getattr(self.executor, "gpus", None)
        if gpus is not None and gpus.total and gpus.needed(launch_for(spec)) > gpus.total:
            raise FailedPrecondition(
                f"the job needs {gpus.needed(launch_for(spec))} GPUs (processes_per_node x gpus per process); "
                f"this node has {gpus.total}: lower processes_per_node"
            )
        if cfg.nodes > 1 and not getattr(self.executor, "multi_node", False):
            raise FailedPrecondition(
                f"nodes={cfg.nodes} needs the Kubernetes executor (--executor kubernetes); "
                "this trainer runs workers locally: use processes_per_node for several processes on this node"
            )
        if cfg.base_model.startswith("registry://"):
            return spec, cfg  # resolved and downloaded by the worker
        base = resolve_local_base(cfg.base_model)
        if base is None:
            whose = " (this trainer's default base: set --default-base-model on the trainer, or base_model)"
            raise FailedPrecondition(
                f"base model {cfg.base_model!r}{whose if defaulted else ''} not found: give a local directory with "
                "config.json, a hub id already in the local Hugging Face cache, or registry://name@alias of a model "
                "artifact"
            )
        check_against_base(cfg, inspect_base(base))
        return spec, cfg

    def _validate_merge(self, spec: JobSpec) -> None:
        from tunedock.v1 import adapter_registry_pb2

        if not spec.output_name:
            raise InvalidArgument("output_name is required: the registry name the merged model is published under")
        check_name(spec.output_name)
        version = self._source_version(spec.merge_adapter, "merge_adapter")
        if version.kind != adapter_registry_pb2.ARTIFACT_KIND_LORA_ADAPTER:
            raise FailedPrecondition(f"merge_adapter {spec.merge_adapter!r} is not a LoRA adapter")
        base = spec.base_model or version.lineage.base_model
        if not base or resolve_local_base(base) is None:
            raise FailedPrecondition(
                f"the base of {spec.merge_adapter!r} ({base or 'not recorded'!r}) is not available here; "
                "set base_model to a local directory with config.json"
            )

    def _source_version(self, ref: str, field: str):
        """The registry version `ref` names, as the caller may see it (another project's answers as missing)."""
        from tunedock.client import RegistryClient

        Ref.parse(ref)
        with RegistryClient(self.registry_address, timeout=30, token=self.registry_token) as registry:
            try:
                version = registry.get(ref)
            except TuneDockError as exc:
                raise registry_answer(exc, f"{field} {ref!r}", "trainer") from None
        if not principal().may_access(version.project):
            raise NotFound(f"{field} {ref!r}: artifact {Ref.parse(ref).name!r} not found")
        return version

    def _validate_extract(self, spec: JobSpec) -> JobSpec:
        """An extraction: its source is a Full or Freeze result of a base this trainer can reach; knobs in range.

        Filled in here so the stored spec says what ran: max_rank (this trainer's max_lora_rank when
        unset) and, without eval datasets, the source job's data and split, so fidelity is measured
        on the same held-out examples the source was evaluated on.
        """
        from services.common.basemodels import base_fingerprint
        from tunedock.v1 import adapter_registry_pb2

        x = spec.extract
        assert x is not None
        if not spec.output_name:
            raise InvalidArgument("output_name is required: the registry name the extracted adapter is published under")
        check_name(spec.output_name)
        if not x.source:
            raise InvalidArgument("extract.source is required: the registry reference of a Full or Freeze result")
        if x.max_rank > self.max_lora_rank:
            raise InvalidArgument(
                f"extract.max_rank {x.max_rank} is above {self.max_lora_rank}, the inference replicas' max_lora_rank "
                "(trainer setting max_lora_rank): such an adapter could not be served; raise max_lora_rank on both"
            )
        x = x.model_copy(update={"max_rank": x.max_rank or self.max_lora_rank})
        spec = spec.model_copy(update={"extract": x})
        extract_options(x)  # range checks, with messages naming the field
        version = self._source_version(x.source, "extract.source")
        kinds = (adapter_registry_pb2.ARTIFACT_KIND_MODEL, adapter_registry_pb2.ARTIFACT_KIND_DELTA)
        if version.kind not in kinds:
            lora = version.kind == adapter_registry_pb2.ARTIFACT_KIND_LORA_ADAPTER
            what = "a LoRA adapter already; serve it as it is" if lora else "not a model or delta"
            raise FailedPrecondition(
                f"extract.source {x.source!r} is {what}: extraction takes a Full (model) or Freeze (delta) result"
            )
        base = spec.base_model or version.lineage.base_model
        if not base:
            raise FailedPrecondition(
                f"{x.source!r} records no base model; set base_model to the model it was trained from"
            )
        if not base.startswith("registry://"):
            if resolve_local_base(base) is None:
                raise FailedPrecondition(
                    f"the base of {x.source!r} ({base!r}) is not available here; set base_model to a local "
                    "directory with config.json (the model it was trained from)"
                )
            check_same_base(
                f"{version.name}:{version.version}",
                version.lineage.base_fingerprint,
                version.lineage.base_model,
                base,
                base_fingerprint(base),
            )
        for dataset_id in spec.eval_dataset_ids:
            if self.get_dataset(dataset_id).project != spec.project:
                raise FailedPrecondition(f"dataset {dataset_id!r} belongs to another project than the job's")
        if not spec.eval_dataset_ids and version.lineage.job_id:
            spec = self._with_eval_data(spec, version.lineage.job_id)
        return spec

    def _validate_then_extract(self, spec: JobSpec) -> JobSpec:
        """A Full or Freeze job that extracts its adapter once it succeeds: its knobs in range now, not
        after the training they follow."""
        x = spec.then_extract
        assert x is not None
        if spec.method.kind not in ("full", "freeze"):
            raise InvalidArgument(
                f"then_extract is for Full and Freeze jobs; a {spec.method.kind} job's adapter serves as trained"
            )
        if x.source:
            raise InvalidArgument("then_extract.source must be empty: the source is this job's result")
        if x.max_rank > self.max_lora_rank:
            raise InvalidArgument(
                f"then_extract.max_rank {x.max_rank} is above {self.max_lora_rank}, the inference replicas' "
                "max_lora_rank (trainer setting max_lora_rank): such an adapter could not be served"
            )
        extract_options(x)
        check_name(follow_up_name(spec.output_name))
        return spec

    # ----------------------------------------------------------------------- follow-ups

    def follow_up(self, job: JobRecord) -> JobRecord | None:
        """The extraction a Full/Freeze job with then_extract submitted when it succeeded (None before)."""
        if job.spec.then_extract is None:
            return None
        try:
            return self.store.get_job(follow_up_id(job.id))
        except NotFound:
            return None

    async def _submit_follow_up(self, job: JobRecord) -> None:
        """Submit the extraction of a succeeded job's result, once (its id is derived from the job's, so a
        trainer that died between the two submits it at recovery, and never twice)."""
        if job.spec.then_extract is None or job.state != "succeeded":
            return
        if await asyncio.to_thread(self.follow_up, job) is not None:
            return
        # No registry round trip: the source is known to be this job's Full/Freeze result on a base
        # this trainer reached, so a registry outage cannot fail (or delay) the submission.
        x = job.spec.then_extract
        x = x.model_copy(update={"source": job.output_ref, "max_rank": x.max_rank or self.max_lora_rank})
        spec = JobSpec(
            base_model=job.spec.base_model,
            extract=x,
            output_name=follow_up_name(job.spec.output_name),
            labels={**job.spec.labels, FOLLOWS_LABEL: job.id},
            project=job.project,
        )
        spec = await asyncio.to_thread(self._with_eval_data, spec, job.id)
        follow_id = follow_up_id(job.id)
        first = state_event("queued", f"extracts a LoRA adapter from {job.id}'s result {job.output_ref}")
        try:
            await asyncio.to_thread(self.store.add_job, follow_id, spec, first, job.project)
        except Exception:
            if await asyncio.to_thread(self.follow_up, job) is not None:  # submitted meanwhile (a recovery)
                return
            raise
        log.info("job %s: extraction %s submitted", job.id, follow_id, extra={"job_id": follow_id})
        self._notify(job.id)
        self._notify(follow_id)
        await self.schedule()

    def _with_eval_data(self, spec: JobSpec, source_job_id: str) -> JobSpec:
        """`spec` measuring fidelity on the source job's held-out data (its eval sets, or its split)."""
        try:
            source = self.store.get_job(source_job_id)
        except NotFound:
            return spec  # trained elsewhere: fidelity is measured on built-in prompts
        if source.project != spec.project:
            return spec
        trained = source.spec
        update: dict = {"eval_dataset_ids": trained.eval_dataset_ids}
        hyper: dict = {"max_seq_length": spec.hyperparameters.max_seq_length or trained.hyperparameters.max_seq_length}
        if not trained.eval_dataset_ids and trained.validation_split:
            update |= {"train_dataset_ids": trained.train_dataset_ids, "validation_split": trained.validation_split}
            hyper["seed"] = trained.hyperparameters.seed
        return spec.model_copy(update=update | {"hyperparameters": spec.hyperparameters.model_copy(update=hyper)})

    async def submit(self, requested: JobSpec) -> JobRecord:
        spec, _ = await asyncio.to_thread(self.validate, requested)  # fills in the default base of a training job
        defaulted = not requested.base_model and bool(spec.base_model) and spec.kind == "train"
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        note = f"no base_model given: training on this trainer's default base {spec.base_model}" if defaulted else ""
        job = await asyncio.to_thread(self.store.add_job, job_id, spec, state_event("queued", note), spec.project)
        audit("trainer.submit", job_id, spec.project, output_name=spec.output_name)
        log.info("job %s queued", job_id, extra={"job_id": job_id, "output": spec.output_name})
        self._notify(job_id)
        await self.schedule()
        return job

    def info(self) -> dict:
        """GetTrainerInfo's answer, less what the server adds (version)."""
        gpus = getattr(self.executor, "gpus", None)
        gpu_count = gpus.total if gpus is not None else 0
        multi_node = bool(getattr(self.executor, "multi_node", False))
        return {
            "default_base_model": self.default_base(),
            "base_model_sources": ["local-path", "hub-cache", "registry"],
            "methods": list(METHODS),
            "dataset_formats": list(DATASET_FORMATS),
            "executor": getattr(self.executor, "kind", ""),
            "device": getattr(self.executor, "device", "cpu"),
            "gpu_count": gpu_count,
            "max_concurrent_jobs": self.max_concurrent,
            "max_attempts": self.max_attempts,
            "max_dataset_bytes": self.max_dataset_bytes,
            "max_lora_rank": self.max_lora_rank,
            "multi_node": multi_node,
        }

    async def schedule(self) -> None:
        """Start queued jobs while slots are free (oldest first)."""
        if self.executor is None:
            return
        async with self._schedule_lock:
            running = await asyncio.to_thread(self.store.count_state, "running")
            queued = await asyncio.to_thread(self.store.jobs_in_state, "queued")
            for job in queued[: max(0, self.max_concurrent - running)]:
                if not self.executor.can_start(launch_for(job.spec)):
                    break  # oldest first: a job waiting for GPUs is not overtaken by smaller ones
                attempt = job.attempt + 1
                message = "started" if attempt == 1 else f"attempt {attempt}: resuming from the last checkpoint"
                await asyncio.to_thread(
                    self.store.update,
                    job.id,
                    [state_event("running", message)],
                    state="running",
                    attempt=attempt,
                    started_at=job.started_at or now(),
                )
                self._notify(job.id)
                await self.executor.start(job.id, attempt, self._launch(job, attempt))

    def _launch(self, job: JobRecord, attempt: int) -> Launch:
        spec = job.spec
        launch = launch_for(spec)
        if self.worker_tokens is None:
            return launch
        token = self.worker_tokens.issue(
            job.id, attempt, job.project, (spec.output_name, f"{spec.output_name}-full"), self.worker_token_ttl_s
        )
        return Launch(launch.method, launch.processes_per_node, launch.nodes, token)

    async def cancel(self, job_id: str) -> JobRecord:
        job = await asyncio.to_thread(self.get_job, job_id)
        if job.terminal:
            raise FailedPrecondition(f"job {job_id} already ended ({job.state}); nothing to cancel")
        job, _ = await asyncio.to_thread(
            self.store.update,
            job_id,
            [state_event("cancelled", "cancelled by a client")],
            state="cancelled",
            cancel_requested=True,
            ended_at=now(),
        )
        self._notify(job_id)
        if self.executor is not None:
            await self.executor.cancel(job_id)
        log.info("job %s cancelled", job_id, extra={"job_id": job_id})
        audit("trainer.cancel", job_id, job.project)
        await self.schedule()
        return job

    async def worker_exited(self, job_id: str, attempt: int, code: int, tail: str) -> None:
        """An attempt's worker ended: record it, however long the store refuses (a full disk, a lost
        database). Until then health is NOT_SERVING, and the job's history says how late it was recorded."""
        delay, failed_at, why = 1.0, None, ""
        while True:
            try:
                late = f" (recorded {time.monotonic() - failed_at:.0f} s late: {why})" if failed_at else ""
                await self._record_exit(job_id, attempt, code, tail, late)
                break
            except Exception as exc:
                self.background_failed("worker-exit")
                if failed_at is None:
                    failed_at, why = time.monotonic(), (str(exc) or type(exc).__name__).splitlines()[0][:300]
                    log.exception(
                        "could not record the exit of job %s's worker; retrying until the store accepts it", job_id
                    )
                    await self._state_writable(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        if failed_at is not None:
            log.info("recorded the exit of job %s's worker after %.0f s", job_id, time.monotonic() - failed_at)
            await self._state_writable(True)

    async def _state_writable(self, writable: bool) -> None:
        self.unwritable_since = None if writable else (self.unwritable_since or time.monotonic())
        with contextlib.suppress(Exception):
            await self.set_serving(writable)

    async def _record_exit(self, job_id: str, attempt: int, code: int, tail: str, late: str) -> None:
        """An attempt's worker ended without finishing the job: retry it, or fail the job.

        Only attempts that ended for the job's own reasons (a crash, an OOM kill) count against
        max_attempts; a worker that gave up on our infrastructure (EXIT_PLATFORM: the registry
        stayed unreachable) is retried without counting, up to MAX_PLATFORM_RETRIES times.
        """
        job = await asyncio.to_thread(self.store.get_job, job_id)
        if job.terminal or job.attempt != attempt:
            if job.state == "succeeded" and job.attempt == attempt:
                await asyncio.to_thread(self.prune_checkpoints, job_id)
            await self.schedule()
            return
        platform = code == EXIT_PLATFORM
        if platform:
            reason = "the worker could not reach TuneDock's services (see its log)"
        else:
            reason = f"worker exited with code {code}" if code >= 0 else f"worker killed by signal {-code}"
        if code == -9:
            reason += " (SIGKILL: out of memory, or killed)"
        reason += late
        failures = job.failures + (0 if platform else 1)
        platform_retries = job.attempt - failures
        if failures < self.max_attempts and platform_retries <= MAX_PLATFORM_RETRIES:
            note = "; will resume (not counted against max_attempts)" if platform else "; will resume"
            await asyncio.to_thread(
                self.store.update,
                job_id,
                [state_event("queued", reason + note)],
                state="queued",
                failures=failures,
            )
        else:
            detail = f"{reason} after {job.attempt} attempt(s)"
            last = [line for line in tail.splitlines() if line.strip()]
            if last:
                detail += f": {last[-1][:500]}"
            await asyncio.to_thread(
                self.store.update, job_id, [state_event("failed", detail)], state="failed", error=detail, ended_at=now()
            )
        self._notify(job_id)
        await self.schedule()

    async def recover(self) -> None:
        """After a trainer restart: jobs that were running lost their worker; queue them again.

        The restart is the platform's doing, so it costs the job none of its attempts; workers the
        previous trainer left running are stopped first (a GPU must not serve two attempts).
        """
        reap = getattr(self.executor, "reap", None)
        if reap is not None:
            await reap()
        for job in await asyncio.to_thread(self.store.jobs_in_state, "running"):
            await asyncio.to_thread(
                self.store.update, job.id, [state_event("queued", "trainer restarted; will resume")], state="queued"
            )
        for job in await asyncio.to_thread(self.store.jobs_in_state, "succeeded"):
            if job.spec.then_extract is not None:  # a restart between success and its extraction's submission
                await self._submit_follow_up(job)
        await self.schedule()

    # ------------------------------------------------------------------------------- reports

    def _live_attempt(self, job_id: str, attempt: int) -> JobRecord:
        """The job, if `attempt` is its current one and it has not ended (cancelled jobs pass: the worker must hear)."""
        job = self.get_job(job_id)
        if attempt != job.attempt:
            raise FailedPrecondition(f"attempt {attempt} of {job_id} was superseded by attempt {job.attempt}; stop")
        if job.terminal and job.state != "cancelled":
            raise FailedPrecondition(f"job {job_id} already ended ({job.state})")
        return job

    async def heartbeat(self, job_id: str, attempt: int) -> bool:
        """The worker is alive; returns whether it should stop (cancelled)."""
        job = await asyncio.to_thread(self._live_attempt, job_id, attempt)
        return job.state == "cancelled"

    async def report(self, job_id: str, attempt: int, event: JobEvent) -> bool:
        """Record a worker's event; returns whether the worker should stop."""
        job = await asyncio.to_thread(self._live_attempt, job_id, attempt)
        if job.state == "cancelled":
            return True
        fields: dict = {}
        if event.progress is not None:
            fields.update(step=event.progress.step, total_steps=event.progress.total_steps)
        elif event.published is not None:
            fields.update(output_ref=event.published.ref, metrics=dict(event.published.metrics))
        elif event.state is not None:
            state = event.state.state
            if state not in ("succeeded", "failed"):
                raise InvalidArgument("workers may only report the states succeeded or failed")
            fields.update(state=state, ended_at=now())
            if state == "failed":
                fields["error"] = event.state.message
        updated, _ = await asyncio.to_thread(self.store.update, job_id, [event], **fields)
        self._notify(job_id)
        if updated.state == "succeeded":
            await self._submit_follow_up(updated)
        return False

    def prune_checkpoints(self, job_id: str) -> None:
        """A succeeded job's checkpoints: all but the newest `checkpoints_kept` removed, and its kept
        output (published now), once its worker has exited."""
        folder = self.data_dir / "trainer" / "checkpoints" / job_id
        steps = sorted(folder.glob("step-*"))
        doomed = [*steps[: max(0, len(steps) - self.checkpoints_kept)], folder / "final"]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        if self.checkpoints_kept == 0:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("pruned the checkpoints of %s (kept %d)", job_id, min(len(steps), self.checkpoints_kept))

    def checkpoint_bytes(self) -> int:
        """Bytes jobs' checkpoints hold on the trainer's volume (the node caches beside them not counted)."""
        total = 0
        for job in (self.data_dir / "trainer" / "checkpoints").glob("*"):
            if job.name in NODE_CACHES:
                continue
            for path in job.rglob("*"):
                with contextlib.suppress(OSError):
                    if path.is_file() and not path.is_symlink():
                        total += path.stat().st_size
        return total

    def assignment(self, job_id: str) -> tuple[JobRecord, Path]:
        job = self.get_job(job_id)
        if job.terminal:
            raise FailedPrecondition(f"job {job_id} already ended ({job.state})")
        return job, self.data_dir / "trainer" / "checkpoints" / job_id

    # --------------------------------------------------------------------------------- watch

    def _notify(self, job_id: str) -> None:
        self.changes.notify(job_id)

    async def watch(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """Past events after `after`, then new ones, until the job has ended and all were sent."""
        await asyncio.to_thread(self.get_job, job_id)
        while True:
            changed = self.changes.current(job_id)
            events = await asyncio.to_thread(self.store.events_after, job_id, after)
            for event in events:
                yield event
                after = event.sequence
            if not events:
                job = await asyncio.to_thread(self.store.get_job, job_id)
                if job.state in TERMINAL and not await asyncio.to_thread(self.store.events_after, job_id, after):
                    return
                await self.changes.wait(changed, 1.0)


FOLLOWS_LABEL = "tunedock.follows"
"""Label of an extraction a job submitted for itself (then_extract): the id of the job it follows."""


def follow_up_id(job_id: str) -> str:
    return f"{job_id}-lora"


def follow_up_name(output_name: str) -> str:
    return f"{output_name}-lora"


def launch_for(spec: JobSpec) -> Launch:
    if spec.kind != "train":
        return Launch(method=spec.kind)
    h = spec.hyperparameters
    return Launch(method=spec.method.kind or "", processes_per_node=h.processes_per_node or 1, nodes=h.nodes or 1)


class DatasetUpload:
    """One dataset upload in progress: bytes into a staging file, the size limit checked as they arrive
    (the one place it is checked), so an oversized upload stops at the limit, not at its end."""

    def __init__(self, core: TrainerCore, name: str, fmt: str, project: str, options: SourceOptions) -> None:
        self.core, self.name, self.format, self.project, self.options = core, name, fmt, project, options
        directory = core.data_dir / "trainer" / "staging"
        directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=directory, suffix=".upload")
        self.path = Path(path)
        self._file = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        limit = self.core.max_dataset_bytes
        if self.size > limit:
            raise ResourceExhausted(
                f"dataset is larger than the limit of {limit / 2**20:.0f} MiB (refused after {self.size / 2**20:.1f} "
                "MiB): split it into several datasets, or raise the trainer's --max-dataset-mb "
                "(TUNEDOCK_TRAINER_MAX_DATASET_MB)"
            )
        with disk_errors(f"the upload of {self.name or 'a dataset'}", self.path.parent):
            self._file.write(data)

    def finish(self) -> DatasetRow:
        with disk_errors(f"the upload of {self.name or 'a dataset'}", self.path.parent):
            self._file.close()
        return self.core._store_dataset(self.name, self.format, self.path, self.project, self.options)

    def close(self) -> None:
        """The staging file and what was made from it (an unpacked folder, the JSONL of its records)."""
        close_quietly(self._file)
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".jsonl").unlink(missing_ok=True)
        shutil.rmtree(self.path.with_suffix(".d"), ignore_errors=True)


async def _serving_unknown(serving: bool) -> None:
    """set_serving before a server wires it (tests driving the core alone)."""
