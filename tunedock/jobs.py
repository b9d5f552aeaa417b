"""The four fine-tuning methods and a job's defaults, named once for the SDK, the CLI and the services.

A field a job leaves unset (proto zero) takes the default here: the trainer's TrainConfig uses
these values, and the CLI's options show them, so `tunedock train --help` says what a job gets.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("full", "freeze", "lora", "qlora")
"""In the order of the classic comparison (most memory first); the names of JobSpec.method's oneof."""
ADAPTER_METHODS = ("lora", "qlora")
"""Methods whose result is a LoRA adapter, hot-swapped as trained (Full and Freeze serve through extraction)."""


@dataclass(frozen=True)
class JobDefaults:
    epochs: float = 1.0
    """Epochs when max_steps is unset."""
    batch_size: int = 4
    """Examples per micro-batch, per process."""
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 512
    """Tokens per example (longer ones are truncated)."""
    log_every_steps: int = 1
    max_grad_norm: float = 1.0
    lr_schedule: str = "cosine"
    adapter_learning_rate: float = 2e-4
    """LoRA and QLoRA (the adapter's few weights take large steps)."""
    full_learning_rate: float = 2e-5
    """Full and Freeze (pretrained weights take small steps)."""
    lora_r: int = 8
    lora_alpha_per_rank: float = 2.0
    """alpha = 2 r unless set."""
    target_modules: tuple[str, ...] = ("all-linear",)
    quant_type: str = "nf4"
    compute_dtype: str = "bfloat16"
    trainable_layers: int = 2
    """Freeze: the last N layers train."""

    def learning_rate(self, method: str) -> float:
        return self.adapter_learning_rate if method in ADAPTER_METHODS else self.full_learning_rate


DEFAULTS = JobDefaults()


@dataclass(frozen=True)
class ExtractDefaults:
    energy: float = 0.9
    """Share of the change an extracted adapter keeps when no rank is given."""
    max_dropped_share: float = 0.05
    """Share of the change that may sit in tensors LoRA cannot carry before an extraction refuses."""


EXTRACT_DEFAULTS = ExtractDefaults()
