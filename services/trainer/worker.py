"""The training worker: `python -m services.trainer.worker --job-id J --attempt N --trainer HOST:PORT`.

Runs one attempt of one job, the same way under the local executor and in a Kubernetes
pod: fetch the assignment and datasets from the trainer, train, publish the output to
the registry, and report every event over gRPC. Exit codes: 0 done (or cancelled),
1 the job failed (reported), 2 the trainer refused this attempt.

Under torchrun (several processes) every rank fetches the assignment and trains on its
share of each global batch; rank 0 alone reports, checkpoints and publishes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc
from google.protobuf import duration_pb2, struct_pb2

from services.trainer.config import TrainConfig, config_from_spec
from services.trainer.data.records import Example, parse_dataset
from tunedock.client.channel import connect
from tunedock.v1 import adapter_registry_pb2, common_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("tunedock.worker")


class AttemptSuperseded(Exception):
    """The trainer no longer accepts this attempt (cancelled, superseded or ended): stop quietly."""


class Reporter:
    """Sends events to the trainer; remembers whether the job was cancelled.

    Ranks other than 0 of a multi-process run are silent (`enabled=False`).
    """

    def __init__(self, stub, job_id: str, attempt: int, enabled: bool = True) -> None:
        self.stub, self.job_id, self.attempt, self.enabled = stub, job_id, attempt, enabled
        self.cancelled = False

    def send(self, **event) -> None:
        if not self.enabled:
            return
        request = trainer_pb2.ReportEventRequest(
            job_id=self.job_id, attempt=self.attempt, event=trainer_pb2.JobEvent(**event)
        )
        request.event.time.GetCurrentTime()
        try:
            reply = self.stub.ReportEvent(request, timeout=60)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise AttemptSuperseded(exc.details()) from None
            raise
        self.cancelled = self.cancelled or reply.cancel_requested

    def __call__(self, kind: str, fields: dict) -> None:
        if kind == "progress":
            eta = duration_pb2.Duration()
            eta.FromNanoseconds(int(fields.pop("eta_s") * 1e9))
            self.send(progress=trainer_pb2.ProgressEvent(eta=eta, **fields))
        elif kind == "eval":
            self.send(eval=trainer_pb2.EvalEvent(**fields))
        elif kind == "checkpoint":
            self.send(checkpoint=trainer_pb2.CheckpointEvent(**fields))
        else:
            print(fields["message"], flush=True)
            self.send(log=trainer_pb2.LogEvent(message=fields["message"]))


def load_examples(stub, job_id: str, dataset_ids: list[str]) -> list[Example]:
    examples: list[Example] = []
    for dataset_id in dataset_ids:
        data = b"".join(
            r.data
            for r in stub.DownloadDataset(
                trainer_pb2.DownloadDatasetRequest(job_id=job_id, dataset_id=dataset_id), timeout=600
            )
        )
        examples.extend(parse_dataset(data).examples)
    return examples


def split(cfg: TrainConfig, train: list[Example], evals: list[Example]) -> tuple[list[Example], list[Example]]:
    if evals or not cfg.validation_split:
        return train, evals
    shuffled = train[:]
    random.Random(cfg.seed).shuffle(shuffled)
    n_eval = max(1, int(len(shuffled) * cfg.validation_split))
    return shuffled[n_eval:], shuffled[:n_eval]


def resolve_base(cfg: TrainConfig, registry_address: str, cache: Path) -> str:
    """registry://name@alias -> a local directory holding that model artifact (downloaded once)."""
    if not cfg.base_model.startswith("registry://"):
        return cfg.base_model
    from tunedock.client import RegistryClient

    with RegistryClient(registry_address) as registry:
        resolved = registry.resolve(cfg.base_model.removeprefix("registry://"))
        if resolved.kind != adapter_registry_pb2.ARTIFACT_KIND_MODEL:
            raise ValueError(f"{cfg.base_model} is not a model artifact")
        target = cache / resolved.content_sha256
        if not (target / "config.json").exists():
            registry.download(f"{resolved.name}:{resolved.version}", target)
    return str(target)


def lineage_for(job: trainer_pb2.Job, cfg: TrainConfig, metrics: dict[str, float]) -> adapter_registry_pb2.Lineage:
    from tunedock.fingerprint import fingerprint_model_dir

    hyper = struct_pb2.Struct()
    hyper.update(
        {
            k: v
            for k, v in cfg.to_dict().items()
            if k
            in (
                "epochs",
                "max_steps",
                "learning_rate",
                "lr_schedule",
                "warmup_steps",
                "batch_size",
                "gradient_accumulation_steps",
                "max_seq_length",
                "seed",
                "packing",
                "gradient_checkpointing",
                "weight_decay",
                "max_grad_norm",
            )
        }
    )
    spec = job.spec
    method = {
        "full": common_pb2.METHOD_FULL,
        "freeze": common_pb2.METHOD_FREEZE,
        "lora": common_pb2.METHOD_LORA,
        "qlora": common_pb2.METHOD_QLORA,
    }[cfg.method]
    return adapter_registry_pb2.Lineage(
        base_model=spec.base_model,
        base_fingerprint=fingerprint_model_dir(Path(cfg.base_model)),
        method=method,
        method_config=spec.method,
        job_id=job.id,
        dataset_ids=[*spec.train_dataset_ids, *spec.eval_dataset_ids],
        hyperparameters=hyper,
        metrics=[common_pb2.Metric(name=k, value=v) for k, v in sorted(metrics.items())],
    )


def run(job_id: str, attempt: int, trainer: str) -> int:
    from services.trainer.training.distributed import Dist
    from services.trainer.training.recipe import RunContext, train

    dist = Dist.from_env()
    device = dist.device()
    channel = connect(trainer)
    stub = trainer_pb2_grpc.TrainerWorkerServiceStub(channel)
    try:
        assignment = stub.GetAssignment(trainer_pb2.GetAssignmentRequest(job_id=job_id), timeout=60)
    except grpc.RpcError as exc:
        print(f"trainer refused the assignment: {exc.details()}", file=sys.stderr)
        return 2
    job = assignment.job
    reporter = Reporter(stub, job_id, attempt, enabled=dist.is_primary)
    work = Path(tempfile.mkdtemp(prefix=f"{job_id}-"))
    try:
        if job.spec.merge_adapter:
            return run_merge(job, reporter, assignment.registry_address, work) if dist.is_primary else 0
        cfg = config_from_spec(job.spec)
        dist.init(device)
        if dist.enabled:
            log.info("rank %d of %d on %s", dist.rank, dist.world_size, device)
        if not dist.is_primary:
            dist.barrier()  # rank 0 downloads a registry base once; the others then find it in the cache
        cfg.base_model = resolve_base(
            cfg, assignment.registry_address, Path(assignment.checkpoint_dir).parent / "bases"
        )
        if dist.is_primary:
            dist.barrier()
        train_examples, eval_examples = split(
            cfg, load_examples(stub, job_id, cfg.dataset_ids), load_examples(stub, job_id, cfg.eval_dataset_ids)
        )
        result = train(
            cfg,
            train_examples,
            eval_examples,
            RunContext(
                checkpoint_dir=Path(assignment.checkpoint_dir),
                output_dir=work / "output",
                report=reporter,
                should_stop=lambda: reporter.cancelled,
                device=device,
                dist=dist,
            ),
        )
        if result.stopped or not dist.is_primary:
            return 0
        from tunedock.client import RegistryClient

        with RegistryClient(assignment.registry_address, timeout=120) as registry:
            labels = {label.key: label.value for label in job.spec.labels}
            lineage = lineage_for(job, cfg, result.metrics)
            published = registry.publish_dir(
                result.output_dir, job.spec.output_name, kind=result.kind, lineage=lineage, labels=labels
            )
            ref = f"{published.version.name}:{published.version.version}"
            if result.expanded_dir is not None:
                registry.publish_dir(
                    result.expanded_dir, f"{job.spec.output_name}-full", kind="model", lineage=lineage, labels=labels
                )
        reporter.send(
            published=trainer_pb2.PublishedEvent(
                ref=ref,
                content_sha256=published.version.content_sha256,
                metrics=[common_pb2.Metric(name=k, value=v) for k, v in sorted(result.metrics.items())],
            )
        )
        reporter.send(state=trainer_pb2.StateEvent(state=trainer_pb2.JOB_STATE_SUCCEEDED, message=f"published {ref}"))
        return 0
    except AttemptSuperseded as exc:
        print(f"trainer stopped this attempt: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        _report_failure(reporter, f"{exc.code().name}: {exc.details()}")
        return 1
    except Exception as exc:
        log.exception("training failed")
        _report_failure(reporter, f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        channel.close()
        dist.close()


def run_merge(job: trainer_pb2.Job, reporter: Reporter, registry_address: str, work: Path) -> int:
    """A merge job: adapter + its full-precision base -> a `model` artifact."""
    from services.trainer.training.merge import merge_adapter
    from tunedock.client import RegistryClient
    from tunedock.fingerprint import fingerprint_model_dir

    spec = job.spec
    with RegistryClient(registry_address, timeout=120) as registry:
        adapter = registry.download(spec.merge_adapter, work / "adapter")
        base = spec.base_model or adapter.lineage.base_model
        reporter("log", {"message": f"merging {adapter.name}:{adapter.version} into {base}"})
        started = time.time()
        out = merge_adapter(base, work / "adapter", work / "merged")
        lineage = adapter_registry_pb2.Lineage()
        lineage.CopyFrom(adapter.lineage)
        lineage.base_model = base
        lineage.base_fingerprint = fingerprint_model_dir(Path(base))
        lineage.job_id = job.id
        del lineage.metrics[:]
        lineage.metrics.add(name="merge_time_s", value=time.time() - started)
        labels = {label.key: label.value for label in spec.labels} | {
            "merged_from": f"{adapter.name}:{adapter.version}"
        }
        published = registry.publish_dir(out, spec.output_name, kind="model", lineage=lineage, labels=labels)
    ref = f"{published.version.name}:{published.version.version}"
    reporter.send(
        published=trainer_pb2.PublishedEvent(
            ref=ref, content_sha256=published.version.content_sha256, metrics=list(lineage.metrics)
        )
    )
    reporter.send(state=trainer_pb2.StateEvent(state=trainer_pb2.JOB_STATE_SUCCEEDED, message=f"published {ref}"))
    return 0


def _report_failure(reporter: Reporter, message: str) -> None:
    with contextlib.suppress(grpc.RpcError, AttemptSuperseded):
        reporter.send(state=trainer_pb2.StateEvent(state=trainer_pb2.JOB_STATE_FAILED, message=message[:2000]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one attempt of a TuneDock training job.")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--trainer", required=True, help="address of the trainer's worker API")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    code = run(args.job_id, args.attempt, args.trainer)
    log.info("worker for %s attempt %d exited %d after %.1fs", args.job_id, args.attempt, code, time.time() - started)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
