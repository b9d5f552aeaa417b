"""What a model directory and its weight files say, read without loading a tensor (no torch).

config.json and the safetensors headers (names, dtypes, shapes) are enough to know the layer
count, the parameter names and shapes and which modules are linear: the trainer checks jobs
against them, the registry and inference check adapters, `tunedock plan` sizes memory. The
safetensors library reads and checks a header (its offsets must tile the data exactly, so a
truncated or padded file is refused) through its numpy front end, which needs no torch.
Multimodal checkpoints (Gemma3ForConditionalGeneration) are judged by their language model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tunedock.errors import FailedPrecondition

_LAYER = re.compile(r"^(?P<prefix>.*?)(?:^|\.)layers\.(?P<index>\d+)\.")
NOT_TEXT = ("vision", "audio", "encoder", "projector")


class CorruptSafetensors(ValueError):
    """The file is not a complete, well-formed safetensors file."""


def read_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype": "F32", "shape": [..]}}; CorruptSafetensors if the file does not parse."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = {}
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                piece = handle.get_slice(name)
                header[name] = {"dtype": piece.get_dtype(), "shape": list(piece.get_shape())}
            return header
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptSafetensors(str(exc)) from None


@dataclass(frozen=True)
class BaseInfo:
    path: Path
    num_layers: int
    params: dict[str, list[int]]  # name -> shape
    tied_embeddings: bool = False

    @property
    def layer_prefix(self) -> str:
        return decoder_layer_prefix(list(self.params))

    def in_decoder_layers(self, name: str) -> bool:
        return layer_index(name, self.layer_prefix) is not None

    @property
    def linear_modules(self) -> list[str]:
        """Short names of 2-D weights inside the decoder's layers (what LoRA can target)."""
        names = {
            n.rsplit(".", 2)[-2]
            for n, shape in self.params.items()
            if n.endswith(".weight") and len(shape) == 2 and self.in_decoder_layers(n)
        }
        return sorted(names)


def decoder_layer_prefix(names: list[str]) -> str:
    """The prefix of the language model's decoder layers ("model.layers.", "model.language_model.layers.")."""
    found = sorted({m.group("prefix") for n in names if (m := _LAYER.match(n))})
    prefixes = [p + ("." if p else "") + "layers." for p in found]
    if not prefixes:
        return "model.layers."
    for p in prefixes:
        if "language_model" in p:
            return p
    text = [p for p in prefixes if not any(word in p for word in NOT_TEXT)]
    return min(text or prefixes, key=len)


def layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isascii() and head.isdigit() else None


def inspect_base(path: Path) -> BaseInfo:
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config") or config
    params: dict[str, list[int]] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            header = read_header(file)
        except CorruptSafetensors as exc:
            raise FailedPrecondition(
                f"base model {path}: {file.name} is not a readable safetensors file ({exc})"
            ) from None
        for name, info in header.items():
            params[name] = info["shape"]
    if not params:
        raise FailedPrecondition(f"base model {path} has no *.safetensors weights")
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))) or not any(
        n.endswith("lm_head.weight") for n in params
    )
    return BaseInfo(path, int(text.get("num_hidden_layers", 0)), params, tied)
