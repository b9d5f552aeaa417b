"""The training worker: `python -m services.trainer.worker --job-id J --attempt N --trainer HOST:PORT`.

Runs one attempt of one job, the same way under the local executor and in a Kubernetes
pod: fetch the assignment and datasets from the trainer, train, publish the output to
the registry, and report every event over gRPC. Exit codes: 0 done (or cancelled),
1 the job failed (reported), 2 the trainer stopped this attempt (superseded or ended),
75 (EXIT_PLATFORM) TuneDock's own services stayed unreachable: the trainer retries the
attempt without counting it against the job's max_attempts.

Exactly one version per job, whatever dies when: the finished output is kept beside the
checkpoints until it is published (a retried attempt publishes it without training again),
the publish carries the idempotency key "job:<id>:<output>" (a second publish returns the
first's version), and a registry outage is waited out with backoff, said in the job's events.

Under torchrun (several processes) every rank fetches the assignment and trains on its
share of each global batch; rank 0 alone reports, heartbeats, checkpoints and publishes.
A heartbeat every few seconds stops a superseded worker at once (the trainer restarted and
moved on), instead of at its next report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf import struct_pb2

from services.common.protoconv import from_proto
from services.trainer.config import TrainConfig, config_from_spec
from services.trainer.domain import JobSpec
from services.trainer.executor import EXIT_PLATFORM
from services.trainer.worker.attempt import (
    AttemptSuperseded,
    Heartbeat,
    PlatformUnavailable,
    Reporter,
    load_examples,
    publish,
    report_success,
    resolve_base,
    split,
    with_patience,
)
from tunedock.client.channel import connect
from tunedock.client.errors import translating
from tunedock.errors import TuneDockError
from tunedock.v1 import adapter_registry_pb2, common_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("tunedock.worker")

HYPERPARAMETERS = (
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


def lineage_for(job: trainer_pb2.Job, cfg: TrainConfig, metrics: dict[str, float]) -> adapter_registry_pb2.Lineage:
    from services.common.basemodels import base_fingerprint

    hyper = struct_pb2.Struct()
    hyper.update({k: v for k, v in cfg.to_dict().items() if k in HYPERPARAMETERS})
    spec = job.spec
    method = {
        "full": common_pb2.METHOD_FULL,
        "freeze": common_pb2.METHOD_FREEZE,
        "lora": common_pb2.METHOD_LORA,
        "qlora": common_pb2.METHOD_QLORA,
    }[cfg.method]
    return adapter_registry_pb2.Lineage(
        base_model=spec.base_model,
        base_fingerprint=base_fingerprint(cfg.base_model),
        method=method,
        method_config=spec.method,
        job_id=job.id,
        dataset_ids=[*spec.train_dataset_ids, *spec.eval_dataset_ids],
        hyperparameters=hyper,
        metrics=[common_pb2.Metric(name=k, value=v) for k, v in sorted(metrics.items())],
    )


# ------------------------------------------------------------------------------ the output


def keep_output(final: Path, output_dir: Path, kind: str, metrics: dict, expanded: Path | None) -> None:
    """Move the finished output beside the checkpoints (complete once `result.json` exists)."""
    if final.exists():
        shutil.rmtree(final)
    final.mkdir(parents=True)
    shutil.move(str(output_dir), final / "output")
    if expanded is not None:
        shutil.move(str(expanded), final / "expanded")
    (final / "result.json").write_text(json.dumps({"kind": kind, "metrics": metrics}))


def kept_output(final: Path) -> tuple[str, dict] | None:
    result = final / "result.json"
    if not result.exists():
        return None
    data = json.loads(result.read_text())
    return data["kind"], data["metrics"]


# ---------------------------------------------------------------------------------------- run


def run(job_id: str, attempt: int, trainer: str) -> int:
    from services.trainer.worker.training.distributed import Dist

    dist = Dist.from_env()
    channel = connect(trainer)
    stub = translating(trainer_pb2_grpc.TrainerWorkerServiceStub(channel))
    try:
        assignment = with_patience(
            lambda: stub.GetAssignment(trainer_pb2.GetAssignmentRequest(job_id=job_id), timeout=60), "the trainer"
        )
    except PlatformUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_PLATFORM
    except TuneDockError as exc:
        print(f"trainer refused the assignment: {exc.message}", file=sys.stderr)
        return 2
    job = assignment.job
    reporter = Reporter(stub, job_id, attempt, enabled=dist.is_primary)
    heartbeat = Heartbeat(stub, reporter)
    if dist.is_primary:
        heartbeat.start()
    work = Path(tempfile.mkdtemp(prefix=f"{job_id}-"))
    try:
        if job.spec.merge_adapter:
            return run_merge(job, reporter, assignment.registry_address, work) if dist.is_primary else 0
        if job.spec.HasField("extract"):
            from services.trainer.worker.extraction import run_extract

            return run_extract(job, assignment, reporter, work) if dist.is_primary else 0
        return run_training(job, assignment, reporter, dist, work)
    except AttemptSuperseded as exc:
        print(f"trainer stopped this attempt: {exc}", file=sys.stderr)
        return 2
    except PlatformUnavailable as exc:
        print(f"{exc}; the trainer will retry this attempt", file=sys.stderr)
        return EXIT_PLATFORM
    except TuneDockError as exc:
        _report_failure(reporter, f"{exc.status}: {exc.message}")
        return 1
    except Exception as exc:
        log.exception("training failed")
        _report_failure(reporter, f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        heartbeat.stopped.set()
        shutil.rmtree(work, ignore_errors=True)
        channel.close()
        dist.close()


def run_training(job, assignment, reporter: Reporter, dist, work: Path) -> int:
    from services.trainer.worker.training.recipe import RunContext, train

    cfg = config_from_spec(from_proto(JobSpec, job.spec))
    checkpoints = Path(assignment.checkpoint_dir)
    final = checkpoints / "final"
    kept = kept_output(final)
    if kept is not None and not dist.is_primary:
        return 0
    if kept is not None:
        kind, metrics = kept
        reporter.notice("the training finished in an earlier attempt; publishing its output")
    else:
        dist.init()
        if dist.enabled:
            log.info("rank %d of %d on %s", dist.rank, dist.world_size, dist.device)
        if not dist.is_primary:
            dist.barrier()  # rank 0 downloads a registry base once; the others then find it in the cache
        cfg.base_model = resolve_base(cfg.base_model, assignment.registry_address, checkpoints.parent / "bases")
        if dist.is_primary:
            dist.barrier()
        datasets = checkpoints.parent / "datasets"  # the node's cache, beside the bases'
        train_examples, eval_examples = split(
            cfg.validation_split,
            cfg.seed,
            load_examples(reporter.stub, job.id, cfg.dataset_ids, datasets),
            load_examples(reporter.stub, job.id, cfg.eval_dataset_ids, datasets),
        )
        if cfg.validation_split and not cfg.eval_dataset_ids:
            reporter.notice(
                f"held out {len(eval_examples):,} of {len(train_examples) + len(eval_examples):,} examples for eval "
                f"(validation_split {cfg.validation_split:g}, seed {cfg.seed})"
            )
        result = train(
            cfg,
            train_examples,
            eval_examples,
            RunContext(
                checkpoint_dir=checkpoints,
                output_dir=work / "output",
                report=reporter,
                should_stop=lambda: reporter.cancelled,
                dist=dist,
                token_cache_dir=checkpoints.parent / "tokens",
            ),
        )
        if result.stopped or not dist.is_primary:
            return 0
        kind, metrics = result.kind, result.metrics
        keep_output(final, result.output_dir, kind, metrics, result.expanded_dir)
    labels = {label.key: label.value for label in job.spec.labels}
    lineage = lineage_for(job, cfg, metrics)
    name = job.spec.output_name
    published = publish(
        assignment.registry_address,
        final / "output",
        name,
        kind,
        f"job:{job.id}:output",
        lineage,
        labels,
        reporter.notice,
    )
    if (final / "expanded").exists():
        publish(
            assignment.registry_address,
            final / "expanded",
            f"{name}-full",
            "model",
            f"job:{job.id}:expanded",
            lineage,
            labels,
            reporter.notice,
        )
    report_success(reporter, published, metrics)
    shutil.rmtree(final, ignore_errors=True)
    return 0


def run_merge(job: trainer_pb2.Job, reporter: Reporter, registry_address: str, work: Path) -> int:
    """A merge job: adapter + its full-precision base -> a `model` artifact."""
    from services.common.basemodels import base_fingerprint
    from services.trainer.worker.training.merge import merge_adapter
    from tunedock.client import RegistryClient

    spec = job.spec
    with RegistryClient(registry_address, timeout=120) as registry:
        adapter = with_patience(lambda: registry.download(spec.merge_adapter, work / "adapter"), "the registry")
    base = spec.base_model or adapter.lineage.base_model
    reporter.notice(f"merging {adapter.name}:{adapter.version} into {base}")
    started = time.time()
    out = merge_adapter(base, work / "adapter", work / "merged")
    lineage = adapter_registry_pb2.Lineage()
    lineage.CopyFrom(adapter.lineage)
    lineage.base_model = base
    lineage.base_fingerprint = base_fingerprint(base)
    lineage.job_id = job.id
    del lineage.metrics[:]
    lineage.metrics.add(name="merge_time_s", value=time.time() - started)
    labels = {label.key: label.value for label in spec.labels} | {"merged_from": f"{adapter.name}:{adapter.version}"}
    published = publish(
        registry_address, out, spec.output_name, "model", f"job:{job.id}:output", lineage, labels, reporter.notice
    )
    report_success(reporter, published, {m.name: m.value for m in lineage.metrics})
    return 0


def _report_failure(reporter: Reporter, message: str) -> None:
    with contextlib.suppress(TuneDockError, AttemptSuperseded, PlatformUnavailable):
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
