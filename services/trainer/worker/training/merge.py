"""Merge a LoRA/QLoRA adapter into its full-precision base: W' = W + (alpha/r) * B @ A.

QLoRA adapters were trained against a 4-bit view of the base but record the full-precision
base they came from, so the merge happens on that base in float32 (no quantization error
is baked into the merged weights).
"""

from __future__ import annotations

from pathlib import Path


def merge_adapter(base_model: str, adapter_dir: Path, out: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out)
    return out
