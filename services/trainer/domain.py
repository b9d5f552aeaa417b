"""The trainer's domain: what a job asks for (JobSpec) and what happened to it (JobEvent).

Plain, typed, frozen models, checked at construction. They mirror the wire messages field by
field (services/common/protoconv.py converts in the servicers), but the core and the store see
only these: a job is stored as its JSON, and a second front (HTTP) builds them without a proto.
Enums are short names ("adamw_8bit", "cosine", "succeeded"); "" is unset. The training flow reads
a JobSpec through TrainConfig (config.py), which fills in the defaults and validates the values.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

Optimizer = Literal["", "adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"]
LrSchedule = Literal["", "constant", "linear", "cosine"]
QuantType = Literal["", "nf4", "fp4"]
Dtype = Literal["", "float32", "bfloat16", "float16"]
State = Literal["", "validating", "queued", "running", "succeeded", "failed", "cancelled"]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FullConfig(Model):
    optimizer: Optimizer = ""


class FreezeConfig(Model):
    trainable_layers: int = 0
    trainable_layer_indices: tuple[int, ...] = ()
    trainable_modules: tuple[str, ...] = ()
    extra_modules: tuple[str, ...] = ()
    optimizer: Optimizer = ""
    publish_expanded: bool = False


class LoraConfig(Model):
    r: int | None = None
    """None: the default rank."""
    alpha: float = 0.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False
    optimizer: Optimizer = ""


class QLoraConfig(Model):
    lora: LoraConfig = LoraConfig()
    quant_type: QuantType = ""
    double_quant: bool | None = None
    """None: on."""
    compute_dtype: Dtype = ""
    paged_optimizer: bool | None = None
    """None: on (where CUDA exists)."""


class MethodConfig(Model):
    """Exactly one of the four is set for a training job."""

    full: FullConfig | None = None
    freeze: FreezeConfig | None = None
    lora: LoraConfig | None = None
    qlora: QLoraConfig | None = None

    @property
    def kind(self) -> str | None:
        """full | freeze | lora | qlora, or None for a job that does not train."""
        return next((name for name in ("full", "freeze", "lora", "qlora") if getattr(self, name) is not None), None)


class Hyperparameters(Model):
    epochs: float = 0.0
    max_steps: int = 0
    learning_rate: float = 0.0
    lr_schedule: LrSchedule = ""
    warmup_steps: int = 0
    batch_size: int = 0
    gradient_accumulation_steps: int = 0
    max_seq_length: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False
    packing: bool = False
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 0
    log_every_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    processes_per_node: int = 0
    nodes: int = 0


class ExtractSpec(Model):
    source: str = ""
    rank: int = 0
    energy: float = 0.0
    max_rank: int = 0
    allow_dropped: bool = False
    max_dropped_share: float = 0.0


class JobSpec(Model):
    """A job: train (method set), merge (merge_adapter) or extract (extract); zero values mean defaults."""

    base_model: str = ""
    method: MethodConfig = MethodConfig()
    hyperparameters: Hyperparameters = Hyperparameters()
    train_dataset_ids: tuple[str, ...] = ()
    eval_dataset_ids: tuple[str, ...] = ()
    validation_split: float = 0.0
    output_name: str = ""
    labels: dict[str, str] = {}
    merge_adapter: str = ""
    project: str = ""
    extract: ExtractSpec | None = None
    then_extract: ExtractSpec | None = None
    """Full/Freeze: extract a servable LoRA adapter once the job succeeds (a follow-up job "<id>-lora")."""

    @property
    def kind(self) -> Literal["train", "merge", "extract"]:
        if self.merge_adapter:
            return "merge"
        return "extract" if self.extract is not None else "train"


class StateEvent(Model):
    state: State = ""
    message: str = ""


class ProgressEvent(Model):
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float = 0.0
    learning_rate: float = 0.0
    grad_norm: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_bytes: int = 0
    eta: timedelta | None = None


class EvalEvent(Model):
    step: int = 0
    eval_loss: float = 0.0


class CheckpointEvent(Model):
    step: int = 0
    path: str = ""


class PublishedEvent(Model):
    ref: str = ""
    content_sha256: str = ""
    metrics: dict[str, float] = {}


class LogEvent(Model):
    message: str = ""


class JobEvent(Model):
    """One entry of a job's history; exactly one of the payloads is set."""

    sequence: int = 0
    time: datetime | None = None
    state: StateEvent | None = None
    progress: ProgressEvent | None = None
    eval: EvalEvent | None = None
    checkpoint: CheckpointEvent | None = None
    published: PublishedEvent | None = None
    log: LogEvent | None = None

    @property
    def kind(self) -> str | None:
        names = ("state", "progress", "eval", "checkpoint", "published", "log")
        return next((name for name in names if getattr(self, name) is not None), None)
