"""Checks of a job against its base model, without loading it (no torch).

Reads config.json and the safetensors headers: enough to know the layer count, the
parameter names and which modules are linear, so bad freeze ranges, unknown LoRA target
modules and a tied `lm_head` are refused at submit time with a message that says what
would work. Multimodal checkpoints (Gemma3ForConditionalGeneration) are judged by their
language model: its layer count and its decoder layers, never the vision tower's.
"""

from __future__ import annotations

from services.trainer.config import TrainConfig
from tunedock.errors import FailedPrecondition, InvalidArgument
from tunedock.model_files import NOT_TEXT, BaseInfo, decoder_layer_prefix, layer_index

EXTRA_MODULES = ("embed_tokens", "norm", "lm_head")


def freeze_layer_indices(num_layers: int, cfg: TrainConfig) -> list[int]:
    if cfg.trainable_layer_indices:
        bad = [i for i in cfg.trainable_layer_indices if not 0 <= i < num_layers]
        if bad:
            raise InvalidArgument(
                f"freeze: layer indices {bad} are out of range; this model has layers 0..{num_layers - 1}"
            )
        return sorted(set(cfg.trainable_layer_indices))
    n = cfg.trainable_layers
    if abs(n) > num_layers:
        raise InvalidArgument(
            f"freeze: trainable_layers={n} but this model has {num_layers} layers; use -{num_layers}..{num_layers}"
        )
    return list(range(num_layers - n, num_layers)) if n >= 0 else list(range(0, -n))


def freeze_selection(param_names: list[str], num_layers: int, cfg: TrainConfig, prefix: str = "") -> set[str]:
    """Names of the parameters a Freeze run trains (decoder layers and extra modules of the language model)."""
    prefix = prefix or decoder_layer_prefix(param_names)
    layers = set(freeze_layer_indices(num_layers, cfg))
    chosen = set()
    for name in param_names:
        parts = name.split(".")
        if any(word in part for part in parts for word in NOT_TEXT):
            continue  # the vision tower and its projector never train
        index = layer_index(name, prefix)
        if index is not None:
            if index in layers and (not cfg.trainable_modules or any(m in parts for m in cfg.trainable_modules)):
                chosen.add(name)
        elif any(m in parts for m in cfg.extra_modules):
            chosen.add(name)
    return chosen


def check_against_base(cfg: TrainConfig, info: BaseInfo) -> None:
    """Method knobs that must agree with the base model."""
    if cfg.method == "freeze":
        unknown = [m for m in cfg.extra_modules if m not in EXTRA_MODULES]
        if unknown:
            raise InvalidArgument(f"freeze: unknown extra module(s) {unknown}; choose from {list(EXTRA_MODULES)}")
        if "lm_head" in cfg.extra_modules and info.tied_embeddings:
            raise InvalidArgument(
                "freeze: lm_head is tied to embed_tokens in this model (one weight serves both), so it cannot "
                "train on its own; use extra_modules=['embed_tokens'], which trains the shared weight"
            )
        names = list(info.params)
        layer_parts = {p for n in names if info.in_decoder_layers(n) for p in n.split(".")}
        missing = [m for m in cfg.trainable_modules if m not in layer_parts]
        if missing:
            raise InvalidArgument(
                f"freeze: trainable module(s) {missing} do not exist in this model's layers; "
                f"try e.g. 'mlp', 'self_attn' or one of {info.linear_modules}"
            )
        if not freeze_selection(names, info.num_layers, cfg, info.layer_prefix):
            raise InvalidArgument("freeze: the selection trains no parameter; widen the layers or modules")
    if cfg.is_lora and cfg.target_modules != ["all-linear"]:
        unknown = [m for m in cfg.target_modules if m not in info.linear_modules]
        if unknown:
            raise InvalidArgument(
                f"unknown LoRA target module(s) {unknown}; this model's linear modules are {info.linear_modules} "
                "(or use all-linear)"
            )


def check_same_base(source: str, recorded: str, recorded_base: str, base: str, fingerprint: str) -> None:
    """An extraction against another base than the source's own is refused (both fingerprints known, different)."""
    if recorded and fingerprint and recorded != fingerprint:
        raise FailedPrecondition(
            f"{source} was trained from {recorded_base or 'another base'} (fingerprint {recorded[:12]}), but the base "
            f"given is {base} (fingerprint {fingerprint[:12]}): a difference against another model is not a "
            "fine-tune; extract against the base it was trained from"
        )
