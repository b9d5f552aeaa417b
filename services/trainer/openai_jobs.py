"""OpenAI's fine-tuning objects as TuneDock's: a job request becomes a JobSpec, records become OpenAI's shapes.

Pure conversion (no I/O), so the mapping is tested on its own and documented in one place
(docs/clients.md, "Fine-tuning with the OpenAI client"):

- `method.type` picks the method: "supervised" trains TuneDock's default (LoRA); "lora", "qlora",
  "full" and "freeze" pick one of the four, their knobs under the key of the same name beside
  `hyperparameters` (the SDKs pass such a dict through unchanged). Full and Freeze jobs extract a
  LoRA adapter when they succeed (knobs under `extract`; a Full job's drops what LoRA cannot carry,
  embeddings and lm_head, and says how much), so every `fine_tuned_model` is servable.
- `hyperparameters`: OpenAI's `n_epochs`, `batch_size`, `learning_rate_multiplier` (a number or
  "auto": TuneDock's default), and any of TuneDock's own by name (`max_steps`, `max_seq_length`,
  `packing`, `validation_split`, ...).
- `suffix` is the registry name the result is published under (each job a new version of it);
  `fine_tuned_model` is the published reference ("name:3"), usable as `model` at once.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from services.trainer.domain import (
    ExtractSpec,
    FreezeConfig,
    FullConfig,
    Hyperparameters,
    JobEvent,
    JobSpec,
    LoraConfig,
    MethodConfig,
    QLoraConfig,
)
from services.trainer.store import DatasetRow, JobRecord
from tunedock.errors import InvalidArgument
from tunedock.jobs import DEFAULTS, METHODS

DEFAULT_METHOD = "lora"
"""What `method.type: supervised` (or no method) trains."""
METHOD_TYPES = ("supervised", *METHODS)
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
OWN_HYPERPARAMETERS = tuple(n for n in Hyperparameters.model_fields if n not in ("epochs", "seed"))
LORA_KNOBS = tuple(LoraConfig.model_fields)
QLORA_KNOBS = tuple(n for n in QLoraConfig.model_fields if n != "lora")
KNOBS = {
    "full": tuple(FullConfig.model_fields),
    "freeze": tuple(FreezeConfig.model_fields),
    "lora": LORA_KNOBS,
    "qlora": (*LORA_KNOBS, *QLORA_KNOBS),
}
EXTRACT_KNOBS = ("rank", "energy", "max_rank", "allow_dropped", "max_dropped_share")
STATUS = {
    "validating": "validating_files",
    "queued": "queued",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}
CREATE_FIELDS = (
    "model",
    "training_file",
    "validation_file",
    "suffix",
    "seed",
    "hyperparameters",
    "method",
    "metadata",
    "integrations",
)
RESULTS_PREFIX = "file-results-"
"""Id of a job's metrics CSV (result_files): RESULTS_PREFIX + the job id."""


def bad(message: str, param: str) -> InvalidArgument:
    exc = InvalidArgument(message)
    exc.param = param  # type: ignore[attr-defined]  # OpenAI's error.param
    return exc


# ------------------------------------------------------------------------------ requests


def job_spec(body: dict, default_base: str, project: str) -> JobSpec:
    """The JobSpec an OpenAI `POST /v1/fine_tuning/jobs` body asks for; refusals name the field."""
    unknown = sorted(set(body) - set(CREATE_FIELDS))
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}; a fine-tuning job takes {', '.join(CREATE_FIELDS)}", unknown[0])
    for name in ("model", "training_file"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise bad(f"{name} is required (a string)", name)
    if body.get("integrations"):
        raise bad(
            "integrations (e.g. wandb) are not supported: follow the job's events or its result file", "integrations"
        )
    method_type, knobs, hyper = _method(body)
    hyper = {**_dict(body.get("hyperparameters"), "hyperparameters"), **hyper}  # method's win over the legacy field
    base = _base(body["model"], default_base)
    hyperparameters, validation_split = _hyperparameters(hyper, method_type)
    if body.get("seed") is not None:
        if not isinstance(body["seed"], int) or isinstance(body["seed"], bool):
            raise bad("seed must be an integer", "seed")
        hyperparameters = hyperparameters.model_copy(update={"seed": body["seed"]})
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise bad("suffix must be a string", "suffix")
    output_name = (suffix or f"ft-{method_type}-{uuid.uuid4().hex[:8]}").lower()
    method, then_extract = _method_config(method_type, knobs)
    validation_file = body.get("validation_file")
    if validation_file is not None and not isinstance(validation_file, str):
        raise bad("validation_file must be a file id (a string)", "validation_file")
    return JobSpec(
        base_model=base,
        method=method,
        hyperparameters=hyperparameters,
        train_dataset_ids=(body["training_file"],),
        eval_dataset_ids=(validation_file,) if validation_file else (),
        validation_split=validation_split,
        output_name=output_name,
        labels=_metadata(body.get("metadata")),
        project=project,
        then_extract=then_extract,
    )


def _dict(value: Any, param: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{param} must be an object", param)
    return value


def _method(body: dict) -> tuple[str, dict, dict]:
    """(method type, its knobs, its hyperparameters) of `method`; supervised without one."""
    method = _dict(body.get("method"), "method")
    kind = method.get("type", "supervised")
    if kind not in METHOD_TYPES:
        raise bad(
            f"method.type {kind!r} is not supported; TuneDock trains {', '.join(METHOD_TYPES)} "
            f"(supervised: TuneDock's default, {DEFAULT_METHOD})",
            "method.type",
        )
    unknown = sorted(set(method) - {"type", kind})
    if unknown:
        raise bad(
            f"method.{unknown[0]} does not go with method.type {kind!r}: put the knobs under method.{kind}", "method"
        )
    knobs = dict(_dict(method.get(kind), f"method.{kind}"))
    hyper = _dict(knobs.pop("hyperparameters", None), f"method.{kind}.hyperparameters")
    return (DEFAULT_METHOD if kind == "supervised" else kind), knobs, hyper


def _base(model: str, default_base: str) -> str:
    """ "" (the trainer's default base) for "auto" or the default base by its path or directory name
    (the id inference serves it under); any other model as given (a path, a hub id, registry://...)."""
    if (
        model == "auto"
        or model == default_base
        or (default_base and model == default_base.rstrip("/").rsplit("/", 1)[-1])
    ):
        return ""
    return model


def _hyperparameters(hyper: dict, method: str) -> tuple[Hyperparameters, float]:
    allowed = (*OPENAI_HYPERPARAMETERS, *OWN_HYPERPARAMETERS, "validation_split")
    values: dict[str, Any] = {}
    for name, value in hyper.items():
        param = f"hyperparameters.{name}"
        if name not in allowed:
            raise bad(f"unknown hyperparameter {name!r}; known: {', '.join(allowed)}", param)
        if value == "auto" and name in OPENAI_HYPERPARAMETERS:
            continue  # TuneDock's default
        if name == "n_epochs":
            values["epochs"] = _number(value, param, minimum=0)
        elif name == "learning_rate_multiplier":
            if "learning_rate" in hyper:
                raise bad("give learning_rate_multiplier or learning_rate, not both", param)
            values["learning_rate"] = _number(value, param, minimum=0) * DEFAULTS.learning_rate(method)
        else:
            values[name] = value
    split = values.pop("validation_split", 0.0)
    try:
        return Hyperparameters.model_validate(values), float(split)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        raise bad(f"hyperparameters.{name}: {first['msg']}", f"hyperparameters.{name}") from None
    except (TypeError, ValueError):
        raise bad("hyperparameters.validation_split must be a number", "hyperparameters.validation_split") from None


def _number(value: Any, param: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= minimum:
        raise bad(f'{param} must be a number above {minimum:g} or "auto", got {value!r}', param)
    return float(value)


def _method_config(method: str, knobs: dict) -> tuple[MethodConfig, ExtractSpec | None]:
    param = f"method.{method}"
    knobs = dict(knobs)
    extract = _dict(knobs.pop("extract", None), f"{param}.extract")
    if method == "freeze" and not knobs.get("trainable_layer_indices"):
        knobs.setdefault("trainable_layers", DEFAULTS.trainable_layers)  # the proto's 0 means "none"
    if extract and method not in ("full", "freeze"):
        raise bad(f"{param}.extract is for Full and Freeze (a {method} adapter serves as trained)", f"{param}.extract")
    try:
        if method == "qlora":
            lora = {k: knobs.pop(k) for k in LORA_KNOBS if k in knobs}
            config = MethodConfig.model_validate({"qlora": {**knobs, "lora": lora}})
        else:
            config = MethodConfig.model_validate({method: knobs})
        # A Full job changes embeddings and lm_head too, which LoRA cannot carry: its adapter reproduces the
        # rest, and the job's result says how much was dropped (extract_dropped_share), rather than
        # failing after the training. `extract: {"allow_dropped": false}` asks for the refusal instead.
        if method == "full":
            extract = {"allow_dropped": True, **extract}
        then = ExtractSpec.model_validate(extract) if method in ("full", "freeze") else None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if str(p) not in (method, "lora")]
        name = ".".join(loc)
        where = f"{param}.extract" if extract and name in EXTRACT_KNOBS else param
        known = EXTRACT_KNOBS if where.endswith(".extract") else KNOBS[method]
        raise bad(f"{where}.{name}: {first['msg']} (knobs: {', '.join(known)})", f"{where}.{name}") from None
    return config, then


def _metadata(metadata: Any) -> dict[str, str]:
    metadata = _dict(metadata, "metadata")
    if len(metadata) > 16:
        raise bad("metadata holds at most 16 keys", "metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise bad(f"metadata[{key!r}]: keys are at most 64 characters, values strings of at most 512", "metadata")
    return dict(metadata)


# ------------------------------------------------------------------------------ objects


def _ts(when: datetime | None) -> int | None:
    return int(when.timestamp()) if when else None


def file_object(row: DatasetRow) -> dict:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.size,
        "created_at": _ts(row.created_at),
        "filename": row.name,
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
        "tunedock": {
            "format": row.format,
            "records": row.num_records,
            "project": row.project,
            "ignored_columns": list(row.ignored_columns or []),
            "stats": row.stats or {},
        },
    }


def results_file_object(job: JobRecord, size: int) -> dict:
    return {
        "id": RESULTS_PREFIX + job.id,
        "object": "file",
        "bytes": size,
        "created_at": _ts(job.ended_at or job.created_at),
        "filename": f"{job.id}-results.csv",
        "purpose": "fine-tune-results",
        "status": "processed",
        "status_details": None,
    }


def status_of(job: JobRecord, follow: JobRecord | None) -> str:
    """The OpenAI status of a job and (Full/Freeze) the extraction that makes it servable."""
    if job.state != "succeeded" or job.spec.then_extract is None:
        return STATUS.get(job.state, "queued")
    if follow is None or follow.state in ("queued", "validating", "running"):
        return "running"  # trained; its adapter is being extracted
    return STATUS[follow.state]


def job_object(job: JobRecord, follow: JobRecord | None = None) -> dict:
    spec, h = job.spec, job.spec.hyperparameters
    method = spec.method.kind or DEFAULT_METHOD
    status = status_of(job, follow)
    final = follow if spec.then_extract is not None else job
    served = final.output_ref if final is not None and status == "succeeded" else None
    learning_rate = h.learning_rate or DEFAULTS.learning_rate(method)
    hyperparameters = {
        "n_epochs": h.epochs or DEFAULTS.epochs,
        "batch_size": h.batch_size or DEFAULTS.batch_size,
        "learning_rate_multiplier": learning_rate / DEFAULTS.learning_rate(method),
    }
    error = None
    if status == "failed":
        failed = job if job.state == "failed" else follow
        assert failed is not None
        code = "training_failed" if failed is job else "extraction_failed"
        error = {"code": code, "message": failed.error or "the job failed; see its events", "param": None}
    ended = final.ended_at if final is not None and status in ("succeeded", "failed") else job.ended_at
    if status == "running" and job.state == "succeeded":
        ended = None
    extension: dict[str, Any] = {
        "method": method,
        "project": job.project,
        "output_ref": job.output_ref or None,
        "step": job.step,
        "total_steps": job.total_steps,
        "metrics": job.metrics,
    }
    if follow is not None:
        extension["extraction"] = {
            "job_id": follow.id,
            "state": follow.state,
            "output_ref": follow.output_ref or None,
            "metrics": follow.metrics,  # extract_rank, greedy agreement, KL: what the served adapter keeps
        }
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": _ts(job.created_at),
        "finished_at": _ts(ended) if status in ("succeeded", "failed", "cancelled") else None,
        "model": spec.base_model.rstrip("/").rsplit("/", 1)[-1] if spec.base_model.startswith("/") else spec.base_model,
        "fine_tuned_model": served,
        "organization_id": job.project,
        "status": status,
        "training_file": spec.train_dataset_ids[0] if spec.train_dataset_ids else None,
        "validation_file": spec.eval_dataset_ids[0] if spec.eval_dataset_ids else None,
        "hyperparameters": hyperparameters,
        "method": {"type": method, method: {"hyperparameters": hyperparameters}},
        "trained_tokens": int(job.metrics["trained_tokens"]) if "trained_tokens" in job.metrics else None,
        "estimated_finish": _estimated_finish(job),
        "error": error,
        "result_files": [RESULTS_PREFIX + job.id] if job.step else [],
        "seed": h.seed,
        "integrations": [],
        "metadata": dict(spec.labels) or None,
        "user_provided_suffix": spec.output_name,
        "tunedock": extension,
    }


def _estimated_finish(job: JobRecord) -> int | None:
    """When a running job should end, from its pace so far (steps since its start)."""
    if job.state != "running" or not job.started_at or not job.step or not job.total_steps:
        return None
    elapsed = time.time() - job.started_at.timestamp()
    return int(time.time() + elapsed / job.step * max(job.total_steps - job.step, 0))


def event_id(job_id: str, sequence: int) -> str:
    return f"ftevent-{job_id}-{sequence}"


def parse_event_id(event: str) -> tuple[str, int]:
    """(job id, sequence) of an event id; InvalidArgument for one not issued here."""
    job, _, seq = event.removeprefix("ftevent-").rpartition("-")
    if not event.startswith("ftevent-") or not job or not seq.isdigit():
        raise bad(f"after={event!r} is not an event id from this API (ftevent-...)", "after")
    return job, int(seq)


def event_object(job_id: str, event: JobEvent, prefix: str = "") -> dict:
    """An OpenAI fine_tuning.job.event: a message, or (progress, eval) metrics with their data."""
    level, kind, message = "info", "message", ""
    data: dict[str, Any] | None = None
    if event.state is not None:
        message = {
            "queued": "Job queued",
            "running": "Job started",
            "succeeded": "The job has successfully completed",
            "failed": "Job failed",
            "cancelled": "Job cancelled",
        }.get(event.state.state, f"Job {event.state.state}")
        if event.state.message:
            message += f": {event.state.message}"
        level = "error" if event.state.state == "failed" else "info"
        data = {"state": event.state.state}
    elif event.progress is not None:
        p = event.progress
        kind, message = "metrics", f"Step {p.step}/{p.total_steps}: training loss={p.loss:.4f}"
        data = {
            "step": p.step,
            "total_steps": p.total_steps,
            "train_loss": p.loss,
            "learning_rate": p.learning_rate,
            "grad_norm": p.grad_norm,
            "tokens_per_second": p.tokens_per_second,
            "peak_memory_bytes": p.peak_memory_bytes,
            "epoch": p.epoch,
        }
    elif event.eval is not None:
        kind, message = "metrics", f"Step {event.eval.step}: validation loss={event.eval.eval_loss:.4f}"
        data = {"step": event.eval.step, "valid_loss": event.eval.eval_loss}
    elif event.checkpoint is not None:
        message, data = f"Checkpoint saved at step {event.checkpoint.step}", {"step": event.checkpoint.step}
    elif event.published is not None:
        message = f"Published {event.published.ref}"
        data = {"ref": event.published.ref, "content_sha256": event.published.content_sha256}
    elif event.log is not None:
        message = event.log.message
        level = "warn" if message.lower().startswith(("warning", "warn")) else "info"
    return {
        "id": event_id(job_id, event.sequence),
        "object": "fine_tuning.job.event",
        "created_at": _ts(event.time) or 0,
        "level": level,
        "message": prefix + message,
        "data": data,
        "type": kind,
    }


def checkpoints(job: JobRecord, events: list[JobEvent], served: str | None) -> list[dict]:
    """OpenAI fine_tuning.job.checkpoint objects, newest first: each saved checkpoint (its train loss the
    last reported at or before its step, its valid loss the eval at its step) and the published result
    at the last step. Only the published one is servable (`fine_tuned_model_checkpoint`); the others
    are the worker's resume points, named `<job>:step-<n>`."""
    train_loss: dict[int, float] = {}
    valid_loss: dict[int, float] = {}
    saved: list[tuple[int, datetime | None]] = []
    for e in events:
        if e.progress is not None:
            train_loss[e.progress.step] = e.progress.loss
        elif e.eval is not None:
            valid_loss[e.eval.step] = e.eval.eval_loss
        elif e.checkpoint is not None:
            saved.append((e.checkpoint.step, e.time))
    out = []
    for step, when in saved:
        out.append(_checkpoint(job, step, when, f"{job.id}:step-{step}", train_loss, valid_loss))
    if served and job.step:
        out.append(_checkpoint(job, job.step, job.ended_at, served, train_loss, valid_loss))
    return sorted(out, key=lambda c: c["step_number"], reverse=True)


def _checkpoint(job, step, when, name, train_loss, valid_loss) -> dict:
    before = [s for s in train_loss if s <= step]
    metrics: dict[str, Any] = {"step": step}
    if before:
        metrics["train_loss"] = train_loss[max(before)]
    if step in valid_loss:
        metrics["valid_loss"] = valid_loss[step]
    return {
        "id": f"ftckpt-{job.id}-{step}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": _ts(when) or _ts(job.created_at),
        "fine_tuned_model_checkpoint": name,
        "fine_tuning_job_id": job.id,
        "metrics": metrics,
        "step_number": step,
    }


RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens_per_second", "peak_memory_bytes")


def results_csv(events: list[JobEvent]) -> bytes:
    """A job's metrics, one row per reported step (OpenAI's result file; columns in RESULT_COLUMNS)."""
    rows: dict[int, dict] = {}
    for e in events:
        if e.progress is not None:
            p = e.progress
            rows.setdefault(p.step, {}).update(
                step=p.step,
                train_loss=p.loss,
                learning_rate=p.learning_rate,
                tokens_per_second=round(p.tokens_per_second, 3),
                peak_memory_bytes=p.peak_memory_bytes,
            )
        elif e.eval is not None:
            rows.setdefault(e.eval.step, {"step": e.eval.step})["valid_loss"] = e.eval.eval_loss
    out = io.StringIO()
    writer = csv.DictWriter(out, RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return out.getvalue().encode()
