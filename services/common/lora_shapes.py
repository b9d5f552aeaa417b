"""Which module shapes a LoRA adapter was made for, and whether a base has them (no torch).

An adapter's tensors say the shape of every linear module it adapts: lora_A is [r, in] and lora_B
[out, r]. The registry records that signature at publish; an inference replica compares it with
the modules of the base it serves (read from the base's safetensors headers) before the engine
sees the adapter. An adapter made for a base of another width would otherwise crash the engine
for everyone (a wider base) or be served silently as garbage (a narrower one).

Modules are compared by their place in the decoder ("layers.3.self_attn.q_proj"), which PEFT's
key prefixes and a multimodal checkpoint's naming ("language_model.model.layers...") do not change.
"""

from __future__ import annotations

import re
from pathlib import Path

SERVABLE_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts."""
SERVABLE_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}
)
"""The modules vLLM's LoRA layers hot-swap (Phi3's fused qkv_proj/gate_up_proj too); lm_head and the
embeddings are not hot-swappable."""
DEFAULT_MAX_LORA_RANK = 64
"""The inference replicas' max_lora_rank unless set, and so the cap of an extracted adapter's rank."""

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")
_NOT_TEXT = ("vision", "audio", "projector")


def layer_key(module: str) -> str | None:
    """ "layers.N.<rest>" of a decoder module; None for modules outside the decoder's layers."""
    if any(word in part for part in module.split(".") for word in _NOT_TEXT):
        return None
    match = _LAYER.search(module)
    return match.group(1) if match else None


def adapter_module_shapes(header: dict[str, dict]) -> dict[str, list[int]]:
    """{layer key: [in_features, out_features]} from an adapter's safetensors header."""
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, info in header.items():
        match = _LORA.match(name)
        if match:
            pairs.setdefault(match["module"], {})[match["ab"]] = info["shape"]
    shapes = {}
    for module, ab in pairs.items():
        key = layer_key(module)
        if key is not None and "A" in ab and "B" in ab:
            shapes[key] = [int(ab["A"][1]), int(ab["B"][0])]
    return shapes


def base_module_shapes(base_dir: Path) -> dict[str, list[int]]:
    """{layer key: [in_features, out_features]} of every 2-D weight in a base's decoder layers."""
    from tunedock.model_files import read_header

    shapes = {}
    for file in sorted(Path(base_dir).glob("*.safetensors")):
        for name, info in read_header(file).items():
            if name.endswith(".weight") and len(info["shape"]) == 2:
                key = layer_key(name.removesuffix(".weight"))
                if key is not None:
                    shapes[key] = [int(info["shape"][1]), int(info["shape"][0])]
    return shapes


def mismatches(adapter: dict[str, list[int]], base: dict[str, list[int]]) -> list[str]:
    """What does not fit, one line per module (empty when the adapter fits the base)."""
    problems = []
    for key, (in_features, out_features) in sorted(adapter.items()):
        have = base.get(key)
        if have is None:
            problems.append(f"{key} does not exist in the served base")
        elif list(have) != [in_features, out_features]:
            problems.append(
                f"{key} is [in={in_features}, out={out_features}] in the adapter but [in={have[0]}, out={have[1]}] "
                "in the served base"
            )
    return problems
