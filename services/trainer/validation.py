"""Checks of a job against its base model, without loading it (no torch).

Reads config.json and the safetensors headers: enough to know the layer count, the
parameter names and which modules are linear, so bad freeze ranges and unknown LoRA
target modules are refused at submit time with a message that says what would work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from services.adapter_registry.validation import read_safetensors_header
from services.common.errors import FailedPrecondition, InvalidArgument
from services.trainer.config import TrainConfig

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EXTRA_MODULES = ("embed_tokens", "norm", "lm_head")


@dataclass(frozen=True)
class BaseInfo:
    path: Path
    num_layers: int
    params: dict[str, list[int]]  # name -> shape

    @property
    def linear_modules(self) -> list[str]:
        """Short names of 2-D weights inside decoder layers (what LoRA can target)."""
        names = {
            n.rsplit(".", 2)[-2]
            for n, shape in self.params.items()
            if n.endswith(".weight") and len(shape) == 2 and _LAYER.search(n)
        }
        return sorted(names)


def resolve_local_base(base_model: str) -> Path | None:
    """A local directory with config.json, or a model in the local Hugging Face cache; None if neither."""
    path = Path(base_model).expanduser()
    if (path / "config.json").is_file():
        return path
    if "/" in base_model and not base_model.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(base_model, local_files_only=True))
            return cached if (cached / "config.json").is_file() else None
        except Exception:
            return None
    return None


def inspect_base(path: Path) -> BaseInfo:
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config)
    params: dict[str, list[int]] = {}
    for file in sorted(path.glob("*.safetensors")):
        for name, info in read_safetensors_header(file, file.name).items():
            params[name] = info["shape"]
    if not params:
        raise FailedPrecondition(f"base model {path} has no *.safetensors weights")
    return BaseInfo(path, int(config.get("num_hidden_layers", 0)), params)


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


def freeze_selection(param_names: list[str], num_layers: int, cfg: TrainConfig) -> set[str]:
    """Names of the parameters a Freeze run trains."""
    layers = set(freeze_layer_indices(num_layers, cfg))
    chosen = set()
    for name in param_names:
        match = _LAYER.search(name)
        parts = name.split(".")
        if match:
            if int(match.group(1)) in layers and (
                not cfg.trainable_modules or any(m in parts for m in cfg.trainable_modules)
            ):
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
        names = list(info.params)
        layer_parts = {p for n in names if _LAYER.search(n) for p in n.split(".")}
        missing = [m for m in cfg.trainable_modules if m not in layer_parts]
        if missing:
            raise InvalidArgument(
                f"freeze: trainable module(s) {missing} do not exist in this model's layers; "
                f"try e.g. 'mlp', 'self_attn' or one of {info.linear_modules}"
            )
        if not freeze_selection(names, info.num_layers, cfg):
            raise InvalidArgument("freeze: the selection trains no parameter; widen the layers or modules")
    if cfg.is_lora and cfg.target_modules != ["all-linear"]:
        unknown = [m for m in cfg.target_modules if m not in info.linear_modules]
        if unknown:
            raise InvalidArgument(
                f"unknown LoRA target module(s) {unknown}; this model's linear modules are {info.linear_modules} "
                "(or use all-linear)"
            )
