"""What every kind of job's attempt uses: reporting to the trainer, patience with the platform, data, bases, publishing.

Training, merge and extraction attempts (services.trainer.worker, services.trainer.worker.extraction)
share these, so a registry outage is waited out, and an event reaches the trainer, the same way
whatever the job does.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from google.protobuf import duration_pb2

from services.trainer.data.records import Example
from services.trainer.worker.dataset_files import Concatenated, Subset, fetch, split_indices
from tunedock.errors import DeadlineExceeded, FailedPrecondition, TuneDockError, Unavailable
from tunedock.v1 import adapter_registry_pb2, common_pb2, trainer_pb2

log = logging.getLogger("tunedock.worker")

HEARTBEAT_S = 3.0
PLATFORM_PATIENCE_S = float(os.environ.get("TUNEDOCK_WORKER_PATIENCE_S", "600"))
"""How long a worker waits out an unreachable trainer or registry before giving up the attempt
(TUNEDOCK_WORKER_PATIENCE_S; the trainer then starts a new attempt, which costs the job nothing)."""
TRANSIENT = (Unavailable, DeadlineExceeded)


class AttemptSuperseded(Exception):
    """The trainer no longer accepts this attempt (cancelled, superseded or ended): stop quietly."""


class PlatformUnavailable(Exception):
    """The trainer or the registry stayed unreachable: the attempt ends without counting as a failure."""


def event_fields(event) -> dict:
    """A training event as the JobEvent field that carries it (the one place records meet protos)."""
    from services.trainer.worker.training.events import Checkpoint, Eval, Log, Progress

    if isinstance(event, Progress):
        eta = duration_pb2.Duration()
        eta.FromNanoseconds(int(event.eta_s * 1e9))
        return {
            "progress": trainer_pb2.ProgressEvent(
                step=event.step,
                total_steps=event.total_steps,
                epoch=event.epoch,
                loss=event.loss,
                learning_rate=event.learning_rate,
                grad_norm=event.grad_norm,
                tokens_per_second=event.tokens_per_second,
                peak_memory_bytes=event.peak_memory_bytes,
                eta=eta,
            )
        }
    if isinstance(event, Eval):
        return {"eval": trainer_pb2.EvalEvent(step=event.step, eval_loss=event.eval_loss)}
    if isinstance(event, Checkpoint):
        return {"checkpoint": trainer_pb2.CheckpointEvent(step=event.step, path=event.path)}
    if isinstance(event, Log):
        return {"log": trainer_pb2.LogEvent(message=event.message)}
    raise TypeError(f"not a training event: {event!r}")


def with_patience(call: Callable, what: str, notice: Callable[[str], None] = lambda m: None):
    """Run `call`, retrying with backoff while the other side is unavailable, for up to PLATFORM_PATIENCE_S."""
    deadline = time.monotonic() + PLATFORM_PATIENCE_S
    delay = 1.0
    while True:
        try:
            return call()
        except TRANSIENT as exc:
            if time.monotonic() + delay > deadline:
                notice(f"{what}: unavailable ({exc.status}) for {PLATFORM_PATIENCE_S:.0f}s; ending this attempt")
                raise PlatformUnavailable(
                    f"{what}: unreachable for {PLATFORM_PATIENCE_S:.0f}s ({exc.status})"
                ) from None
            notice(f"{what}: unavailable ({exc.status}); trying again in {delay:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


class Reporter:
    """Sends events to the trainer; remembers whether the job was cancelled.

    Ranks other than 0 of a multi-process run are silent (`enabled=False`). Progress and log
    events are best effort while the trainer is unreachable; results and states are retried.
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
        essential = "published" in event or "state" in event
        try:
            if essential:
                reply = with_patience(lambda: self.stub.ReportEvent(request, timeout=60), "the trainer")
            else:
                reply = self.stub.ReportEvent(request, timeout=60)
        except FailedPrecondition as exc:
            raise AttemptSuperseded(exc.message) from None
        except TRANSIENT as exc:
            log.warning("trainer unreachable; event dropped: %s", exc.status)
            return
        self.cancelled = self.cancelled or reply.cancel_requested

    def __call__(self, event) -> None:
        from services.trainer.worker.training.events import Log

        if isinstance(event, Log):
            print(event.message, flush=True)
        self.send(**event_fields(event))

    def notice(self, message: str) -> None:
        print(message, flush=True)
        self.send(log=trainer_pb2.LogEvent(message=message))


class Heartbeat(threading.Thread):
    """Every HEARTBEAT_S: tells the trainer the attempt lives; exits the process once it is superseded."""

    def __init__(self, stub, reporter: Reporter) -> None:
        super().__init__(daemon=True, name="heartbeat")
        self.stub, self.reporter = stub, reporter
        self.stopped = threading.Event()

    def run(self) -> None:
        request = trainer_pb2.HeartbeatRequest(job_id=self.reporter.job_id, attempt=self.reporter.attempt)
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                reply = self.stub.Heartbeat(request, timeout=10)
                self.reporter.cancelled = self.reporter.cancelled or reply.cancel_requested
            except FailedPrecondition as exc:
                print(f"trainer stopped this attempt: {exc.message}", file=sys.stderr, flush=True)
                os._exit(2)  # superseded: another attempt owns the job (and the GPU) now
            except TuneDockError:
                pass  # unreachable: the trainer is restarting; its new run reaps or supersedes us


def load_examples(stub, job_id: str, dataset_ids: list[str], cache: Path) -> Sequence[Example]:
    """The datasets' examples, parsed as training reaches them: each downloaded once per node into
    `cache` (content-addressed), indexed by record offsets (dataset_files.py), never held whole."""
    files = []
    for dataset_id in dataset_ids:
        request = trainer_pb2.DownloadDatasetRequest(job_id=job_id, dataset_id=dataset_id)

        def download(target: Path, request=request) -> None:
            def write() -> None:
                with target.open("wb") as out:
                    for chunk in stub.DownloadDataset(request, timeout=600):
                        out.write(chunk.data)

            with_patience(write, "the trainer")

        files.append(fetch(dataset_id, cache, download))
    return Concatenated(files)


def split(
    validation_split: float, seed: int, train: Sequence[Example], evals: Sequence[Example]
) -> tuple[Sequence[Example], Sequence[Example]]:
    """(train, eval): the eval datasets when given, else a seeded `validation_split` share of the training data."""
    if len(evals) or not validation_split:
        return train, evals
    train_indices, eval_indices = split_indices(len(train), validation_split, seed)
    return Subset(train, train_indices), Subset(train, eval_indices)


def resolve_base(base_model: str, registry_address: str, cache: Path) -> str:
    """registry://name@alias -> a local directory holding that model artifact (downloaded once)."""
    if not base_model.startswith("registry://"):
        return base_model
    from tunedock.client import RegistryClient

    with RegistryClient(registry_address) as registry:
        resolved = with_patience(lambda: registry.resolve(base_model.removeprefix("registry://")), "the registry")
        if resolved.kind != adapter_registry_pb2.ARTIFACT_KIND_MODEL:
            raise FailedPrecondition(f"{base_model} is not a model artifact")
        target = cache / resolved.content_sha256
        if not (target / "config.json").exists():
            with_patience(lambda: registry.download(f"{resolved.name}:{resolved.version}", target), "the registry")
    return str(target)


def publish(
    registry_address: str,
    directory: Path,
    name: str,
    kind: str,
    key: str,
    lineage,
    labels: dict,
    notice: Callable[[str], None],
):
    """Publish with the job's idempotency key, waiting out a registry outage."""
    from tunedock.client import RegistryClient

    def attempt():
        with RegistryClient(registry_address, timeout=120) as registry:
            return registry.publish_dir(directory, name, kind=kind, lineage=lineage, labels=labels, idempotency_key=key)

    return with_patience(attempt, "the registry", notice)


def report_success(reporter: Reporter, published, metrics: dict[str, float], note: str = "") -> str:
    """The end of every successful attempt: the published version, then SUCCEEDED; returns "name:version".

    The trainer records the job's output and metrics from the PublishedEvent, so it comes first.
    """
    version = published.version
    ref = f"{version.name}:{version.version}"
    reporter.send(
        published=trainer_pb2.PublishedEvent(
            ref=ref,
            content_sha256=version.content_sha256,
            metrics=[common_pb2.Metric(name=k, value=v) for k, v in sorted(metrics.items())],
        )
    )
    message = f"published {ref}" + (f" ({note})" if note else "")
    reporter.send(state=trainer_pb2.StateEvent(state=trainer_pb2.JOB_STATE_SUCCEEDED, message=message))
    return ref
