"""The model a method trains: loaded in the right precision, with the right attention, parts frozen.

- Precision: on CUDA, matmuls run in bf16 (fp16 with loss scaling where bf16 is missing); weights
  that do not train are stored in that dtype too (Freeze's frozen layers, LoRA's base), trainable
  ones in fp32, except a single-GPU Full run, which keeps bf16 weights with an 8-bit AdamW as
  torchtune's single-device recipe does (8B would not fit in 80 GB otherwise). Under FSDP, Full
  keeps fp32 shards and computes in bf16 (a mixed-precision policy). On CPU everything is fp32.
- Attention: FlashAttention where installed on CUDA (variable-length packing, sliding windows,
  soft-capping); eager for models with attention soft-capping elsewhere (SDPA drops `softcap`:
  Gemma2 would train a different model than vLLM serves); SDPA otherwise.
- Families: a multimodal checkpoint (Gemma3ForConditionalGeneration) trains its language model
  only: the vision tower and projector stay frozen and unquantized, and all-linear LoRA targets
  the decoder's layers only.
- QLoRA: NF4/FP4 base with double quantization; unlike peft's `prepare_model_for_kbit_training`,
  embeddings and `lm_head` stay in the compute dtype (fp32 copies cost 2 GB at 8B); only 1-D
  parameters (norms, biases) are kept in fp32.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.trainer.worker.training.anatomy import decoder_of
from services.trainer.worker.training.distributed import Dist

VISION_PARTS = ("vision_tower", "multi_modal_projector", "vision_model", "audio_tower")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """How a run stores and computes."""

    compute: torch.dtype | None
    """Autocast dtype (None: no autocast, fp32 math)."""
    frozen: torch.dtype
    """Dtype of weights that do not train."""
    scaler: bool = False
    """fp16 needs loss scaling (a GradScaler)."""

    def autocast(self, device: str):
        if self.compute is None:
            return torch.autocast(device.split(":")[0], enabled=False)
        return torch.autocast(device.split(":")[0], dtype=self.compute)

    def describe(self) -> str:
        compute = str(self.compute or torch.float32).removeprefix("torch.")
        return f"compute {compute}, frozen weights {str(self.frozen).removeprefix('torch.')}" + (
            ", loss scaling" if self.scaler else ""
        )


def choose_precision(compute_dtype: str, device: str, notice: Callable[[str], None]) -> Precision:
    if not device.startswith("cuda"):
        return Precision(None, torch.float32)
    wanted = DTYPES[compute_dtype]
    if wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        notice("this GPU has no bf16: computing in fp16 with loss scaling")
        wanted = torch.float16
    if wanted == torch.float32:
        return Precision(None, torch.float32)
    return Precision(wanted, wanted, scaler=wanted == torch.float16)


def attention_for(config, device: str) -> tuple[str, str]:
    """The attention implementation for this model on this device, and why."""
    text = config.get_text_config()
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2", "FlashAttention-2: variable-length packing, sliding windows, soft-capping"
        except ImportError:
            pass
    if getattr(text, "attn_logit_softcapping", None):
        return "eager", f"eager: SDPA would drop attention soft-capping ({text.attn_logit_softcapping})"
    window = getattr(text, "sliding_window", None)
    return "sdpa", "SDPA" + (f" (sliding window {window} applied through the mask)" if window else "")


def is_multimodal(config) -> bool:
    return config.get_text_config() is not config


def decoder_linear_names(model) -> list[str]:
    """Short names of the linear modules inside the decoder's layers (what all-linear LoRA adapts)."""
    names = set()
    for name, module in decoder_of(model).layers.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    use_rslora: bool


@dataclass(frozen=True)
class QuantSpec:
    quant_type: str
    double_quant: bool
    compute_dtype: torch.dtype


def load_base(
    base_model: str,
    device: str,
    dtype: torch.dtype,
    attention: str,
    quant: QuantSpec | None = None,
):
    """The base model on `device` in `dtype` (4-bit where `quant` says so), vision parts frozen."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "attn_implementation": attention}
    if quant is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=quant.compute_dtype,
            llm_int8_skip_modules=["lm_head", *VISION_PARTS],
        )
        kwargs["dtype"] = quant.compute_dtype
    kwargs["device_map"] = {"": torch.device(device)}
    model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    for name, param in model.named_parameters():
        if any(part in name.split(".") for part in VISION_PARTS):
            param.requires_grad_(False)
    return model


def prepare_4bit(model, gradient_checkpointing: bool, autocast: bool = True):
    """QLoRA's base: frozen, the training layout kept (see below), non-quantized weights upcast as needed.

    Under autocast (CUDA) only 1-D parameters (norms, biases) become fp32; embeddings and lm_head
    stay in the compute dtype. Without autocast (CPU) every non-quantized weight is fp32, so that
    a plain forward never mixes dtypes (memory is not what limits a CPU run).
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and (param.ndim == 1 or not autocast):
            param.data = param.data.float()
    keep_4bit_training_layout(model)
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def keep_4bit_training_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the 4-bit modules.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode converts its weight, once and in
    place, to an inference layout: double quantization is undone and matmuls go through
    `gemv_4bit`, which has no backward. After a mid-run eval, gradients would silently stop
    flowing through the frozen base, and the base would no longer be what the job says it is.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def add_lora(model, spec: LoraSpec):
    """LoRA adapters beside the chosen linear modules of the decoder (never the vision tower)."""
    from peft import LoraConfig, get_peft_model

    targets = list(spec.target_modules)
    if targets == ["all-linear"]:
        targets = decoder_linear_names(model)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft annotates int; any positive number works
        lora_dropout=spec.dropout,
        target_modules=targets,
        exclude_modules=_vision_regex() if is_multimodal(model.config) else None,
        use_rslora=spec.use_rslora,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, config)


def _vision_regex() -> str:
    return r".*\b(" + "|".join(re.escape(p) for p in VISION_PARTS) + r")\b.*"


def apply_fused_kernels(model, notice: Callable[[str], None]) -> bool:
    """liger-kernel's fused RMSNorm, SwiGLU and RoPE on CUDA, where it is installed (the loss fuses separately)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    try:
        _apply_liger_kernel_to_instance(
            model=model, rms_norm=True, swiglu=True, rope=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    except Exception as exc:  # a family liger does not know: the plain kernels still work
        notice(f"liger-kernel's fused kernels not applied ({type(exc).__name__}: {exc})")
        return False
    notice("liger-kernel: fused RMSNorm, SwiGLU and RoPE")
    return True


def upcast_trainable(model) -> None:
    """Optimizer state and updates need fp32 master weights for what trains."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def enable_gradient_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


# ------------------------------------------------------------------------------- sharding


def sharded_full_model(base_model: str, dist: Dist, attention: str, precision: Precision):
    """Full fine-tuning under FSDP2: built on the meta device, sharded, filled from rank 0's read.

    Returns the sharded `CausalLMLoss` module. No process but rank 0 ever holds the whole model:
    the others allocate only their shards, which rank 0's tensors are broadcast into. Parameters
    stay fp32 shards; compute and gradient all-gathers run in the compute dtype, reductions in fp32.
    """
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer.worker.training.loss import CausalLMLoss

    config = AutoConfig.from_pretrained(base_model)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float32)
    module = CausalLMLoss(model)
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    policy = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=torch.float32)
    for layer in decoder_of(model).layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    module.to_empty(device=dist.device)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])
    state: dict[str, Any] = (
        {f"model.{k}": v for k, v in _read_checkpoint(base_model).items()} if dist.is_primary else {}
    )
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, param in module.named_parameters():
        if any(part in name.split(".") for part in VISION_PARTS):
            param.requires_grad_(False)
    return module


def _read_checkpoint(base_model: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in fp32, named as the model names them (rank 0 only)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32, device_map="cpu")
    return model.state_dict()


def data_parallel(model, dist: Dist):
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.local_rank] if dist.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)
