"""Estimate peak training memory per method before training (`tunedock plan`). No torch.

peak = runtime + weights + gradients + optimizer state + activations, where
- runtime: what the Python process holds before any model byte (CPU: measured by importing
  the training stack in a subprocess; CUDA: 0, the CUDA allocator's peak excludes it);
- weights: fp32 for Full/Freeze, fp32 (CPU) or bf16 (CUDA) base for LoRA, NF4 (~0.53 bytes per
  parameter with double quantization) for QLoRA's decoder linears with the rest upcast to fp32;
- gradients fp32 and AdamW's two fp32 moments for the trainable parameters;
- activations saved for backward in the layers gradients flow through, plus the logits (checked
  against the tensors autograd actually saves, counted by the trainer, in tests/test_cli.py).
Parameter counts come from the checkpoint's safetensors headers, so any Llama-style model works.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'24GiB', '512 MiB', '1.5g' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 24GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class ModelShape:
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int
    heads: int
    params: dict[str, list[int]]

    def count(self, predicate) -> int:
        total = 0
        for name, shape in self.params.items():
            if predicate(name, shape):
                n = 1
                for d in shape:
                    n *= d
                total += n
        return total


def read_shape(base: Path) -> ModelShape:
    from tunedock.model_files import inspect_base

    info = inspect_base(Path(base))
    config = json.loads((Path(base) / "config.json").read_text())
    config = config.get("text_config", config)
    hidden = config["hidden_size"]
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or hidden // heads
    return ModelShape(
        info.num_layers,
        hidden,
        config.get("intermediate_size", 4 * hidden),
        config["vocab_size"],
        config.get("num_key_value_heads", heads) * head_dim,
        heads,
        info.params,
    )


@dataclass
class Estimate:
    method: str
    trainable: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        """What `tunedock plan --json` and the trainer's /v1/fine_tuning/plan show of it."""
        return {
            "method": self.method,
            "trainable_params": self.trainable,
            "peak_bytes": self.total,
            "parts": self.parts,
        }


@functools.lru_cache(maxsize=2)
def runtime_overhead(device: str) -> int:
    """Bytes the training process holds before loading a model (CPU); 0 on CUDA. Measured once per process."""
    if device == "cuda":
        return 0
    code = (
        "import resource, torch, transformers, peft; from transformers import AutoModelForCausalLM; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def estimate(
    shape: ModelShape,
    method: str,
    batch: int,
    seq: int,
    device: str = "cpu",
    lora_r: int = 16,
    freeze_layers: int = 2,
    grad_ckpt: bool = False,
    overhead: int = 0,
) -> Estimate:
    total = shape.count(lambda n, s: True)
    in_layers = lambda n, s: bool(_LAYER.search(n))  # noqa: E731
    linear = lambda n, s: in_layers(n, s) and n.endswith(".weight") and len(s) == 2  # noqa: E731
    linears = [s for n, s in shape.params.items() if linear(n, s)]
    if method == "full":
        trainable = total
    elif method == "freeze":
        keep = set(range(max(0, shape.num_layers - freeze_layers), shape.num_layers))
        trainable = shape.count(lambda n, s: (m := _LAYER.search(n)) is not None and int(m.group(1)) in keep)
    else:
        trainable = sum(lora_r * (s[0] + s[1]) for s in linears)

    lin_params = sum(s[0] * s[1] for s in linears)
    cuda = device == "cuda"
    # On CUDA, weights that do not train are bf16 and trainable ones fp32 masters, except a
    # single-GPU Full run: bf16 weights and gradients with an 8-bit AdamW (2 bytes of state).
    # On the CPU everything is fp32. (services/trainer/worker/training/model.py)
    grads, optimizer = 4 * trainable, 8 * trainable
    if method == "full":
        weights = (2 if cuda else 4) * total
        if cuda:
            grads, optimizer = 2 * trainable, 2 * trainable
    elif method == "freeze":
        weights = 2 * total + 2 * trainable if cuda else 4 * total
    elif method == "lora":
        weights = (2 if cuda else 4) * total + 4 * trainable
    else:  # NF4 linears (+ absmax constants, double-quantized); the rest bf16 on CUDA, fp32 on the CPU
        weights = int(0.53 * lin_params) + (2 if cuda else 4) * (total - lin_params) + 4 * trainable

    tokens = batch * seq
    act_bytes = 2 if device == "cuda" else 4
    grad_layers = shape.num_layers if method != "freeze" else min(freeze_layers, shape.num_layers)
    # Saved for backward per token and layer: norm inputs/outputs, q, attention output, o_proj input
    # (~6 hidden), the rotated k and v (2 kv widths) and the MLP's gate/up products (~2 intermediate).
    per_layer = tokens * (6 * shape.hidden + 2 * shape.kv_dim + 2 * shape.intermediate) * act_bytes
    # SDPA's math path (taken with packed/padded masks) keeps one batch x heads x seq x seq matrix,
    # and each layer's boolean mask: a packed row of batch x seq tokens has a block-diagonal one of
    # tokens x tokens (best-fit packing fills rows, so a micro-batch reaches that size).
    per_layer += batch * shape.heads * seq * seq * act_bytes + tokens * tokens
    # With checkpointing only each layer's input is kept, plus one layer recomputed at a time.
    activations = grad_layers * tokens * shape.hidden * act_bytes + per_layer if grad_ckpt else grad_layers * per_layer
    # The loss (services/trainer/worker/training/loss.py) keeps only the hidden states of the positions it covers
    # and computes their logits a chunk at a time (about 2**26 logits): on a GPU one chunk's fp32
    # logits and log-softmax exist at once; nothing of them is saved for backward.
    chunk = min(tokens, max(256, 2**26 // shape.vocab))
    logits = tokens * shape.hidden * 4 + (2 * chunk * shape.vocab * 4 if device == "cuda" else 0)
    parts = {
        "runtime": overhead,
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations + logits,
    }
    return Estimate(method, trainable, parts)
