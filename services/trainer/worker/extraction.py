"""An extraction job, worker side: a Full or Freeze result -> a LoRA adapter in the registry, with its fidelity.

1. download the source (`model` or `delta`) and find the base it was trained from;
2. refuse a base other than the source's (fingerprints differ) before any work;
3. cut the adapter out of the difference (services.trainer.worker.training.extract), one module at a time,
   reporting progress per module;
4. measure fidelity against the tuned model on the job's eval data (services.trainer.worker.training.fidelity);
5. publish a `lora_adapter` with lineage extracted_from, the rank, the fidelity metrics, and
   `extraction.json` (every module's energies, what was dropped, the greedy samples) beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from google.protobuf import duration_pb2

from services.common.protoconv import from_proto
from services.trainer.config import extract_options
from services.trainer.domain import ExtractSpec
from services.trainer.validation import check_same_base
from services.trainer.worker.attempt import (
    Reporter,
    load_examples,
    publish,
    report_success,
    resolve_base,
    split,
    with_patience,
)
from tunedock.errors import FailedPrecondition
from tunedock.v1 import adapter_registry_pb2, common_pb2, trainer_pb2

FIDELITY_EXAMPLES = 64
DEFAULT_MAX_SEQ_LENGTH = 512


def run_extract(job: trainer_pb2.Job, assignment, reporter: Reporter, work: Path) -> int:
    from services.common.basemodels import base_fingerprint
    from services.trainer.worker.training.extract import extract_lora
    from services.trainer.worker.training.fidelity import load_pair, measure, sequences
    from tunedock.client import RegistryClient

    spec = job.spec
    x = spec.extract
    options = extract_options(from_proto(ExtractSpec, x))
    registry_address = assignment.registry_address
    started = time.time()
    with RegistryClient(registry_address, timeout=600) as registry:
        source = with_patience(lambda: registry.download(x.source, work / "source"), "the registry")
    ref = f"{source.name}:{source.version}"
    kind = adapter_registry_pb2.ArtifactKind.Name(source.kind)
    if source.kind not in (adapter_registry_pb2.ARTIFACT_KIND_MODEL, adapter_registry_pb2.ARTIFACT_KIND_DELTA):
        raise FailedPrecondition(f"{ref} is a {kind}; extraction takes a model (Full) or delta (Freeze) artifact")
    delta = source.kind == adapter_registry_pb2.ARTIFACT_KIND_DELTA
    base_model = spec.base_model or source.lineage.base_model
    if delta and not base_model:
        base_model = json.loads((work / "source" / "delta_config.json").read_text()).get("base_model", "")
    if not base_model:
        raise FailedPrecondition(f"{ref} records no base model; set base_model to the model it was trained from")
    base_dir = resolve_base(base_model, registry_address, Path(assignment.checkpoint_dir).parent / "bases")
    fingerprint = base_fingerprint(base_dir)
    check_same_base(ref, source.lineage.base_fingerprint, source.lineage.base_model, base_model, fingerprint)

    reporter.notice(
        f"extracting a LoRA adapter from {ref} ({'Freeze delta' if delta else 'full model'}) against {base_model}: "
        + (f"rank {options.rank}" if options.rank else f"the rank that keeps {options.energy:.0%}")
        + f", at most {options.max_rank}"
    )
    tuned_files = [work / "source" / "delta.safetensors"] if delta else sorted((work / "source").glob("*.safetensors"))

    def progress(done: int, total: int) -> None:
        if done == total or done % max(total // 20, 1) == 0:
            eta = duration_pb2.Duration()
            eta.FromNanoseconds(int((time.time() - started) / done * (total - done) * 1e9))
            reporter.send(
                progress=trainer_pb2.ProgressEvent(
                    step=done, total_steps=total, peak_memory_bytes=_peak_memory(), eta=eta
                )
            )

    adapter_dir = work / "adapter"
    extraction = extract_lora(
        Path(base_dir), tuned_files, delta, options, adapter_dir, base_model, ref, progress=progress
    )
    for note in extraction.notes:
        reporter.notice(note)
    reporter.notice(
        f"rank {extraction.rank}: keeps {extraction.retained_share:.1%} of the change in {len(extraction.modules)} "
        f"modules; {extraction.dropped_share:.1%} of it was in tensors LoRA cannot carry"
    )
    extract_time = time.time() - started

    reporter.notice("measuring fidelity: tuned model vs base + extracted adapter")
    examples = _eval_examples(job, reporter, Path(assignment.checkpoint_dir).parent / "datasets")
    tuned, extracted = load_pair(str(base_dir), str(work / "source"), delta, str(adapter_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    max_len = spec.hyperparameters.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
    fidelity = measure(tuned, extracted, tokenizer, sequences(tokenizer, examples, max_len, FIDELITY_EXAMPLES))
    del tuned, extracted
    reporter.notice(
        f"fidelity: mean next-token KL {fidelity.kl_mean:.4f} over {fidelity.kl_tokens} tokens, greedy agreement "
        f"{fidelity.greedy_agreement:.1%}"
        + (
            f", eval loss {fidelity.eval_loss_tuned:.4f} tuned vs {fidelity.eval_loss_extracted:.4f} extracted"
            if fidelity.eval_loss_tuned is not None
            else " (no eval data: measured on built-in prompts)"
        )
    )

    report = extraction.to_json() | {
        "source": ref,
        "base_model": base_model,
        "fidelity": {
            "kl_mean": fidelity.kl_mean,
            "kl_tokens": fidelity.kl_tokens,
            "greedy_agreement": fidelity.greedy_agreement,
            "greedy_exact_match": fidelity.greedy_exact_match,
            "eval_loss_tuned": fidelity.eval_loss_tuned,
            "eval_loss_extracted": fidelity.eval_loss_extracted,
            "eval_examples": len(examples[:FIDELITY_EXAMPLES]),
            "samples": fidelity.samples,
        },
    }
    (adapter_dir / "extraction.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    metrics = extraction.metrics() | fidelity.metrics() | {"extract_time_s": extract_time}
    lineage = adapter_registry_pb2.Lineage(
        base_model=base_model,
        base_fingerprint=fingerprint,
        method=source.lineage.method,
        method_config=source.lineage.method_config,
        job_id=job.id,
        dataset_ids=list(source.lineage.dataset_ids),
        hyperparameters=source.lineage.hyperparameters,
        metrics=[common_pb2.Metric(name=k, value=v) for k, v in sorted(metrics.items())],
        extracted_from=ref,
    )
    labels = {label.key: label.value for label in spec.labels} | {"extracted_from": ref}
    published = publish(
        registry_address,
        adapter_dir,
        spec.output_name,
        "lora_adapter",
        f"job:{job.id}:output",
        lineage,
        labels,
        reporter.notice,
    )
    summary = {k: v for k, v in metrics.items() if not k.startswith("retained_energy.")}
    note = f"rank {extraction.rank}, greedy agreement {fidelity.greedy_agreement:.0%}"
    report_success(reporter, published, summary, note)
    return 0


def _eval_examples(job: trainer_pb2.Job, reporter: Reporter, cache: Path):
    """The spec's eval datasets, else the source job's eval split (its datasets were copied into the spec)."""
    spec = job.spec
    evals = load_examples(reporter.stub, job.id, list(spec.eval_dataset_ids), cache)
    if len(evals):
        return evals
    if spec.train_dataset_ids and spec.validation_split:
        train = load_examples(reporter.stub, job.id, list(spec.train_dataset_ids), cache)
        return split(spec.validation_split, spec.hyperparameters.seed, train, [])[1]
    return []


def _peak_memory() -> int:
    import torch

    from services.trainer.worker.training.memory import peak_memory_bytes

    return peak_memory_bytes("cuda" if torch.cuda.is_available() else "cpu")
