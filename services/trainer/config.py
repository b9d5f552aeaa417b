"""Flat training configuration built from a JobSpec, with defaults and validation.

Like torchtune's config builders: the spec (nested, optional fields) becomes one flat,
documented dataclass that the training flow reads top to bottom. Validation that needs
no model lives in `__post_init__`; checks against the base model's config and weights
(layer ranges, module names) live in `services.trainer.validation`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from services.trainer.domain import ExtractSpec, JobSpec, LoraConfig
from tunedock.errors import InvalidArgument
from tunedock.jobs import ADAPTER_METHODS, DEFAULTS, EXTRACT_DEFAULTS, METHODS


@dataclass
class TrainConfig:
    """Everything one training run needs, flat."""

    base_model: str
    """Local path or hub id of the base model."""
    method: str
    """full | freeze | lora | qlora."""
    dataset_ids: list[str] = field(default_factory=list)
    """Training datasets (concatenated)."""
    eval_dataset_ids: list[str] = field(default_factory=list)
    """Evaluation datasets."""
    validation_split: float = 0.0
    """Fraction of training data held out for eval when there are no eval datasets."""
    output_name: str = ""
    """Registry name of the output."""
    # LoRA / QLoRA
    lora_r: int = DEFAULTS.lora_r
    """Rank of the LoRA update."""
    lora_alpha: float = 0.0
    """LoRA scaling numerator (alpha/r, or alpha/sqrt(r) with rsLoRA); 0: 2 r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULTS.target_modules))
    """Module names to adapt, or ["all-linear"]."""
    use_rslora: bool = False
    """Rank-stabilized scaling."""
    quant_type: str = DEFAULTS.quant_type
    """QLoRA 4-bit type: nf4 | fp4."""
    double_quant: bool = True
    """QLoRA: quantize the quantization constants too."""
    compute_dtype: str = DEFAULTS.compute_dtype
    """Matmul dtype on GPUs (bfloat16, float16 with loss scaling, float32); also QLoRA's 4-bit compute dtype."""
    paged_optimizer: bool = True
    """QLoRA: paged optimizer where CUDA exists."""
    # Freeze
    trainable_layers: int = DEFAULTS.trainable_layers
    """Freeze: train the last N layers (negative: first |N|)."""
    trainable_layer_indices: list[int] = field(default_factory=list)
    """Freeze: explicit layer indices (override trainable_layers)."""
    trainable_modules: list[str] = field(default_factory=list)
    """Freeze: module names inside the chosen layers (empty: whole layers)."""
    extra_modules: list[str] = field(default_factory=list)
    """Freeze: non-layer modules that also train (embed_tokens, norm, lm_head)."""
    publish_expanded: bool = False
    """Freeze: also publish the expanded full model."""
    optimizer: str = ""
    """adamw | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit | sgd; empty: the method's default."""
    # Hyperparameters
    epochs: float = DEFAULTS.epochs
    """Epochs to train when max_steps is 0 (max_steps wins when both are set)."""
    max_steps: int = 0
    learning_rate: float = 0.0
    """0: the method's default (jobs.DEFAULTS.learning_rate)."""
    lr_schedule: str = DEFAULTS.lr_schedule
    warmup_steps: int = 0
    batch_size: int = DEFAULTS.batch_size
    gradient_accumulation_steps: int = DEFAULTS.gradient_accumulation_steps
    max_seq_length: int = DEFAULTS.max_seq_length
    seed: int = 0
    gradient_checkpointing: bool = False
    packing: bool = False
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 0
    log_every_steps: int = DEFAULTS.log_every_steps
    weight_decay: float = 0.0
    max_grad_norm: float = DEFAULTS.max_grad_norm
    processes_per_node: int = 1
    """Training processes per node (torchrun); batch_size is per process."""
    nodes: int = 1
    """Nodes (Kubernetes executor only)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(f"method must be one of {', '.join(METHODS)}")
        if not self.base_model:
            raise InvalidArgument("base_model is required: a local model directory, a hub id, or registry://name@alias")
        if not self.dataset_ids:
            raise InvalidArgument("at least one training dataset id is required (upload with `tunedock data upload`)")
        if not self.learning_rate:
            self.learning_rate = DEFAULTS.learning_rate(self.method)
        if not self.lora_alpha:
            self.lora_alpha = DEFAULTS.lora_alpha_per_rank * max(self.lora_r, 1)
        checks = [
            (self.lora_r > 0, f"LoRA rank r must be > 0, got {self.lora_r}"),
            (self.lora_alpha > 0, f"lora alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"lora dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.quant_type in ("nf4", "fp4"), f"quant_type must be nf4 or fp4, got {self.quant_type}"),
            (self.epochs > 0 or self.max_steps > 0, "set epochs > 0 or max_steps > 0"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}"),
            (self.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be > 0"),
            (
                16 <= self.max_seq_length <= 1 << 17,
                f"max_seq_length must be in [16, 131072], got {self.max_seq_length}",
            ),
            (
                0 <= self.validation_split <= 0.5
                or (self.validation_split >= 1 and float(self.validation_split).is_integer()),
                f"validation_split must be a fraction in [0, 0.5] or a whole number of records, got "
                f"{self.validation_split}",
            ),
            (
                self.warmup_steps >= 0 and self.eval_every_steps >= 0 and self.checkpoint_every_steps >= 0,
                "warmup_steps, eval_every_steps and checkpoint_every_steps must be >= 0",
            ),
            (self.log_every_steps > 0, "log_every_steps must be > 0"),
            (1 <= self.processes_per_node <= 64, f"processes_per_node must be in [1, 64]: {self.processes_per_node}"),
            (1 <= self.nodes <= 256, f"nodes must be in [1, 256], got {self.nodes}"),
            (bool(self.target_modules), "target_modules must name at least one module (or all-linear)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgument(message)
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise InvalidArgument("target_modules: 'all-linear' cannot be combined with module names")

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes

    @property
    def is_lora(self) -> bool:
        return self.method in ADAPTER_METHODS

    def to_dict(self) -> dict:
        return asdict(self)


def _given(**fields) -> dict:
    """The fields a spec sets: zeros, "" and None are left out, so TrainConfig's defaults apply."""
    return {k: v for k, v in fields.items() if v not in (None, 0, 0.0, "", [], ())}


def config_from_spec(spec: JobSpec) -> TrainConfig:
    """The small builder: a training job's JobSpec -> TrainConfig (unset fields take its defaults, validated)."""
    which = spec.method.kind
    if which is None:
        raise InvalidArgument("method is required: set one of full, freeze, lora or qlora")
    h = spec.hyperparameters
    kwargs = _given(
        validation_split=spec.validation_split,
        output_name=spec.output_name,
        epochs=h.epochs,
        max_steps=h.max_steps,
        learning_rate=h.learning_rate,
        lr_schedule=h.lr_schedule,
        warmup_steps=h.warmup_steps,
        batch_size=h.batch_size,
        gradient_accumulation_steps=h.gradient_accumulation_steps,
        max_seq_length=h.max_seq_length,
        seed=h.seed,
        gradient_checkpointing=h.gradient_checkpointing,
        packing=h.packing,
        eval_every_steps=h.eval_every_steps,
        checkpoint_every_steps=h.checkpoint_every_steps,
        log_every_steps=h.log_every_steps,
        weight_decay=h.weight_decay,
        max_grad_norm=h.max_grad_norm,
        processes_per_node=h.processes_per_node,
        nodes=h.nodes,
    )
    if h.max_steps and not h.epochs:
        kwargs["epochs"] = 0.0  # max_steps alone: no epoch bound
    kwargs.update(
        base_model=spec.base_model,
        method=which,
        dataset_ids=list(spec.train_dataset_ids),
        eval_dataset_ids=list(spec.eval_dataset_ids),
    )
    lora: LoraConfig | None = None
    m = spec.method
    if m.full is not None:
        kwargs |= _given(optimizer=m.full.optimizer)
    elif m.freeze is not None:
        f = m.freeze
        kwargs |= _given(
            trainable_layer_indices=list(f.trainable_layer_indices),
            trainable_modules=list(f.trainable_modules),
            extra_modules=list(f.extra_modules),
            optimizer=f.optimizer,
            publish_expanded=f.publish_expanded,
        )
        kwargs["trainable_layers"] = f.trainable_layers  # 0 is a value here (the indices decide)
    elif m.lora is not None:
        lora = m.lora
    elif m.qlora is not None:
        q = m.qlora
        lora = q.lora
        kwargs |= _given(quant_type=q.quant_type, compute_dtype=q.compute_dtype)
        if q.double_quant is not None:
            kwargs["double_quant"] = q.double_quant
        if q.paged_optimizer is not None:
            kwargs["paged_optimizer"] = q.paged_optimizer
    if lora is not None:
        kwargs |= _given(
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            use_rslora=lora.use_rslora,
            optimizer=lora.optimizer,
        )
        if lora.r is not None:
            kwargs["lora_r"] = lora.r
    return TrainConfig(**kwargs)


@dataclass(frozen=True)
class ExtractOptions:
    """How an adapter is cut out of a difference."""

    rank: int = 0
    """Fixed rank for every module; 0 chooses the smallest rank that keeps `energy`."""
    energy: float = EXTRACT_DEFAULTS.energy
    """Share of ΔW's energy (squared Frobenius norm over all liftable modules) to keep when rank is 0."""
    max_rank: int = 64
    """Upper bound on the rank: the inference replicas' max_lora_rank."""
    allow_dropped: bool = False
    """Extract even when tensors LoRA cannot carry hold more than max_dropped_share of the change."""
    max_dropped_share: float = EXTRACT_DEFAULTS.max_dropped_share
    """Share of the whole change that may sit in such tensors before the extraction refuses."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise InvalidArgument(f"extract.rank must be >= 0 (0: choose by energy), got {self.rank}")
        if self.max_rank < 1:
            raise InvalidArgument(f"extract.max_rank must be >= 1, got {self.max_rank}")
        if self.rank > self.max_rank:
            raise InvalidArgument(
                f"extract.rank {self.rank} is above max_rank {self.max_rank}, the largest rank the inference "
                "replicas serve (their max_lora_rank); lower the rank or raise max_lora_rank on both"
            )
        if not 0.0 < self.energy <= 1.0:
            raise InvalidArgument(f"extract.energy must be in (0, 1], got {self.energy}")
        if not 0.0 <= self.max_dropped_share < 1.0:
            raise InvalidArgument(f"extract.max_dropped_share must be in [0, 1), got {self.max_dropped_share}")


def extract_options(spec: ExtractSpec) -> ExtractOptions:
    """The small builder of an extraction: ExtractSpec -> ExtractOptions (zero means the default)."""
    return ExtractOptions(
        **_given(
            rank=spec.rank,
            energy=spec.energy,
            max_rank=spec.max_rank,
            allow_dropped=spec.allow_dropped,
            max_dropped_share=spec.max_dropped_share,
        )
    )
