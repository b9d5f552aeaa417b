"""Extract a LoRA adapter from a Full or Freeze result, so inference can hot-swap it per request.

For every linear module inside the decoder layers, ΔW = W_tuned - W_base in float32 and its
truncated SVD U_r Σ_r V_rᵀ, the best rank-r approximation (Eckart-Young). The adapter stores
B = U_r √Σ_r and A = √Σ_r V_rᵀ with lora_alpha = r, so PEFT's and vLLM's alpha/r · B·A is exactly
the truncated ΔW. A module's discarded energy is ||ΔW||² - sum of the r largest s_i²: exact whichever SVD ran,
because the randomized one returns the exact SVD of ΔW projected on the subspace it found.

The rank is the same for every module (vLLM serves one rank per adapter; a module whose ΔW has
lower rank is padded with zeros, exactly): fixed, or the smallest that keeps a share of the
energy summed over modules, capped so the replicas can serve it.

Tensors LoRA cannot carry (embeddings, lm_head, norms, biases) are reported with their share of
the whole change; by default the extraction refuses when that share is above a threshold.

Memory: both checkpoints are read one tensor at a time from safetensors; the peak is one module
pair plus the factors kept so far (an adapter at max_rank), never a whole model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.common.lora_shapes import layer_key
from services.trainer.config import ExtractOptions
from tunedock.errors import FailedPrecondition

EXACT_SVD_UP_TO = 1024
"""A module whose smaller side is at most this gets a full SVD (cheap); larger ones a randomized one."""
OVERSAMPLE = 16
POWER_ITERATIONS = 6


@dataclass
class ModuleReport:
    """One decoder module's difference and what the adapter keeps of it."""

    key: str  # "layers.3.self_attn.q_proj", the same in every family's naming
    shape: tuple[int, int]  # [out, in]
    energy: float  # ||ΔW||_F^2
    retained: float = 0.0  # sum of the kept s_i^2: what the adapter holds
    svd: str = "exact"  # exact | randomized

    @property
    def discarded(self) -> float:
        return max(self.energy - self.retained, 0.0)

    @property
    def retained_share(self) -> float:
        return self.retained / self.energy if self.energy else 1.0


@dataclass
class Extraction:
    """What an extraction kept and lost; the fidelity measurements are added by the caller."""

    rank: int
    modules: list[ModuleReport]
    dropped: dict[str, float]  # tensor -> ||Δ||^2 of tensors LoRA cannot carry
    options: ExtractOptions
    dtype: str
    notes: list[str] = field(default_factory=list)

    @property
    def liftable_energy(self) -> float:
        return sum(m.energy for m in self.modules)

    @property
    def retained_energy(self) -> float:
        return sum(m.retained for m in self.modules)

    @property
    def dropped_energy(self) -> float:
        return sum(self.dropped.values())

    @property
    def total_energy(self) -> float:
        return self.liftable_energy + self.dropped_energy

    @property
    def retained_share(self) -> float:
        """Share of the liftable modules' change the adapter keeps."""
        return self.retained_energy / self.liftable_energy if self.liftable_energy else 1.0

    @property
    def dropped_share(self) -> float:
        """Share of the whole change that sits in tensors LoRA cannot carry."""
        return self.dropped_energy / self.total_energy if self.total_energy else 0.0

    def metrics(self) -> dict[str, float]:
        out = {
            "extract_rank": float(self.rank),
            "extract_retained_energy": self.retained_share,
            "extract_dropped_share": self.dropped_share,
            "extract_modules": float(len(self.modules)),
        }
        for m in self.modules:
            out[f"retained_energy.{m.key}"] = m.retained_share
        return out

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "dtype": self.dtype,
            "options": self.options.__dict__,
            "liftable_energy": self.liftable_energy,
            "retained_energy": self.retained_energy,
            "retained_share": self.retained_share,
            "dropped_energy": self.dropped_energy,
            "dropped_share": self.dropped_share,
            "modules": [
                {
                    "module": m.key,
                    "shape": list(m.shape),
                    "energy": m.energy,
                    "retained": m.retained,
                    "discarded": m.discarded,
                    "retained_share": m.retained_share,
                    "svd": m.svd,
                }
                for m in self.modules
            ],
            "dropped": [
                {"tensor": name, "energy": e, "share": e / self.total_energy if self.total_energy else 0.0}
                for name, e in sorted(self.dropped.items(), key=lambda item: -item[1])
            ],
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------ checkpoints


_WRAPPERS = {"model", "language_model"}


def canonical(name: str) -> str:
    """A tensor's name with the wrappers that checkpoints and module trees spell differently removed.

    A multimodal checkpoint says "language_model.model.layers.0...", its transformers module tree
    "model.language_model.layers.0..."; both become "layers.0...". Vision towers keep their own names.
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


class Checkpoint:
    """The tensors of a safetensors checkpoint (sharded or not), by canonical name, read one at a time."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        from safetensors import safe_open

        if not files:
            raise FailedPrecondition("no *.safetensors weights found")
        self._where: dict[str, tuple[object, str]] = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                key = canonical(name)
                if key in self._where:
                    raise FailedPrecondition(f"{file.name}: tensors {name!r} and another both read as {key!r}")
                self._where[key] = (handle, name)

    @classmethod
    def of_dir(cls, directory: Path, stack: ExitStack) -> Checkpoint:
        return cls(sorted(Path(directory).glob("*.safetensors")), stack)

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        handle, name = self._where[key]
        return tuple(handle.get_slice(name).get_shape())  # type: ignore[attr-defined]

    def dtype(self, key: str) -> str:
        handle, name = self._where[key]
        return str(handle.get_slice(name).get_dtype())  # type: ignore[attr-defined]

    def get(self, key: str) -> torch.Tensor:
        handle, name = self._where[key]
        return handle.get_tensor(name)  # type: ignore[attr-defined]


def liftable(key: str, shape: tuple[int, ...]) -> bool:
    """A 2-D weight of a module inside the decoder layers: what LoRA (and vLLM's LoRA layers) can carry."""
    return key.endswith(".weight") and len(shape) == 2 and layer_key(key.removesuffix(".weight")) is not None


def changed_pairs(base: Checkpoint, tuned: Checkpoint, partial: bool) -> Iterator[str]:
    """Canonical names to compare. `partial`: the tuned side holds only the tensors that trained (a delta)."""
    extra = [k for k in tuned.names() if k not in base]
    if extra:
        raise FailedPrecondition(
            f"the tuned weights have tensors the base does not ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}): they were not trained from this base"
        )
    if not partial:
        missing = [k for k in base.names() if k not in tuned]
        if missing:
            raise FailedPrecondition(
                f"the base has tensors the tuned model lacks ({', '.join(missing[:3])}): "
                "they were not trained from this base"
            )
    for key in tuned.names():
        if tuple(tuned.shape(key)) != tuple(base.shape(key)):
            raise FailedPrecondition(
                f"{key} is {list(tuned.shape(key))} in the tuned weights but {list(base.shape(key))} in the base: "
                "they were not trained from this base"
            )
        yield key


# ------------------------------------------------------------------------------------ math


def top_singular(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """The k leading singular triplets of `delta` (U [out, k], S [k], Vh [k, in]) and which SVD gave them."""
    smaller = min(delta.shape)
    k = min(k, smaller)
    if smaller <= EXACT_SVD_UP_TO or k + OVERSAMPLE >= smaller // 2:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :k], s[:k], vh[:k], "exact"
    u, s, v = torch.svd_lowrank(delta, q=min(k + OVERSAMPLE, smaller), niter=POWER_ITERATIONS)
    return u[:, :k], s[:k], v[:, :k].T, "randomized"


def choose_rank(spectra: list[torch.Tensor], energy: float, total: float, max_rank: int) -> int:
    """The smallest rank r <= max_rank whose top-r singular values keep `energy` of `total` over all modules."""
    if total <= 0:
        return 1
    kept = torch.zeros(max_rank, dtype=torch.float64)
    for s in spectra:
        cumulative = torch.cumsum(s.double() ** 2, 0)[:max_rank]
        kept[: len(cumulative)] += cumulative
        if len(cumulative) < max_rank and len(cumulative):
            kept[len(cumulative) :] += cumulative[-1]
    enough = torch.nonzero(kept >= energy * total * (1 - 1e-9))
    return int(enough[0]) + 1 if len(enough) else max_rank


# ------------------------------------------------------------------------------ extraction


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _difference(tuned: Checkpoint, base: Checkpoint, key: str, device: torch.device) -> torch.Tensor:
    """W_tuned - W_base in float32: one float32 tensor (the subtraction casts the base's dtype on the fly,
    and the checkpoints' own tensors are memory-mapped)."""
    diff = tuned.get(key).to(device, torch.float32, copy=True)
    diff -= base.get(key).to(device)
    return diff


def _energy(diff: torch.Tensor) -> float:
    """||diff||_F^2 accumulated in float64, squaring a block of rows at a time (no second full-size tensor)."""
    return sum(float(torch.sum(torch.square(rows), dtype=torch.float64)) for rows in diff.split(1024))


def measure_dropped(base: Checkpoint, tuned: Checkpoint, partial: bool) -> tuple[dict[str, float], dict[str, float]]:
    """({liftable module weight: ||ΔW||²}, {other tensor: ||Δ||²}) of every tensor that changed."""
    device = _device()
    lift: dict[str, float] = {}
    dropped: dict[str, float] = {}
    for key in changed_pairs(base, tuned, partial):
        energy = _energy(_difference(tuned, base, key, device))
        if energy == 0.0:
            continue
        (lift if liftable(key, base.shape(key)) else dropped)[key] = energy
    return lift, dropped


def refuse_dropped(source: str, lift: dict[str, float], dropped: dict[str, float], options: ExtractOptions) -> None:
    """The extraction's refusal when LoRA would drop too much of the change (message says what and why)."""
    total = sum(lift.values()) + sum(dropped.values())
    if total == 0:
        raise FailedPrecondition(f"{source} does not differ from its base: there is nothing to extract")
    share = sum(dropped.values()) / total
    listing = ", ".join(
        f"{name} {energy / total:.1%}" for name, energy in sorted(dropped.items(), key=lambda item: -item[1])[:5]
    )
    why = (
        "embeddings, lm_head, norms and biases have no LoRA form that vLLM hot-swaps, so an extracted adapter "
        "cannot carry them"
    )
    if not lift:
        raise FailedPrecondition(
            f"{source}: all of its change is in tensors LoRA cannot carry ({listing}); {why}. Serve it as its own "
            "model instead"
        )
    if share > options.max_dropped_share and not options.allow_dropped:
        raise FailedPrecondition(
            f"{source}: {share:.1%} of its change is in tensors LoRA cannot carry ({listing}), above the "
            f"{options.max_dropped_share:.0%} threshold; {why}. Pass --allow-dropped to extract the rest anyway "
            f"(the adapter then reproduces at most {1 - share:.1%} of the change), or serve the model itself"
        )


def extract_lora(
    base_dir: Path,
    tuned_files: list[Path],
    partial: bool,
    options: ExtractOptions,
    out: Path,
    base_model: str,
    source: str,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> Extraction:
    """Write a PEFT LoRA adapter into `out` that approximates tuned - base; returns the report.

    `tuned_files` are the tuned weights: a model's *.safetensors, or a delta's delta.safetensors
    (`partial`: it holds only the tensors that trained, every other tensor equals the base's).
    """
    device = _device()
    with ExitStack() as stack:
        base = Checkpoint.of_dir(base_dir, stack)
        tuned = Checkpoint(tuned_files, stack)
        lift, dropped = measure_dropped(base, tuned, partial)
        refuse_dropped(source, lift, dropped, options)
        keep = options.rank or options.max_rank
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        reports: list[ModuleReport] = []
        for done, key in enumerate(sorted(lift, key=_module_order), start=1):
            diff = _difference(tuned, base, key, device)
            u, s, vh, how = top_singular(diff, keep)
            factors[key] = (u.cpu(), s.cpu(), vh.cpu())
            shape = tuple(diff.shape)
            reports.append(
                ModuleReport(layer_key(key.removesuffix(".weight")) or key, (shape[0], shape[1]), lift[key], svd=how)
            )
            del diff
            progress(done, len(lift))
        total = sum(lift.values())
        rank = options.rank or choose_rank([f[1] for f in factors.values()], options.energy, total, options.max_rank)
        for report, key in zip(reports, sorted(lift, key=_module_order), strict=True):
            s = factors[key][1][:rank]
            report.retained = min(float(torch.sum(s.double() ** 2)), report.energy)
        dtype = _save_dtype(tuned, sorted(lift))
        extraction = Extraction(rank, reports, dropped, options, str(dtype).removeprefix("torch."))
        if not options.rank and extraction.retained_share < options.energy:
            extraction.notes.append(
                f"rank {rank} (max_rank) keeps {extraction.retained_share:.1%} of the change, less than the "
                f"{options.energy:.0%} asked for"
            )
        _write_adapter(out, factors, rank, dtype, base, base_dir, base_model)
    return extraction


def _module_order(key: str) -> tuple[int, str]:
    match = re.search(r"layers\.(\d+)\.", key)
    return (int(match.group(1)) if match else -1, key)


def _save_dtype(tuned: Checkpoint, keys: list[str]) -> torch.dtype:
    """The tuned weights' own float dtype (float32 for anything else), so the adapter is as precise as they were."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    return names.get(tuned.dtype(keys[0]).upper(), torch.float32) if keys else torch.float32


def _write_adapter(
    out: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    rank: int,
    dtype: torch.dtype,
    base: Checkpoint,
    base_dir: Path,
    base_model: str,
) -> None:
    """adapter_model.safetensors + adapter_config.json, keyed the way PEFT names the modules of this base."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    paths = module_paths(base_dir)
    by_layer_key = {layer_key(key.removesuffix(".weight")): key for key in factors}
    layers = sorted({int(k.split(".")[1]) for k in by_layer_key if k})
    kinds = sorted({k.split(".")[-1] for k in by_layer_key if k})
    tensors: dict[str, torch.Tensor] = {}
    # Every (layer, module kind) the config names gets tensors (zeros where nothing changed), so
    # PEFT loads exactly what is written and initialises nothing at random.
    for key in sorted(paths):
        index, kind = int(key.split(".")[1]), key.split(".")[-1]
        if index not in layers or kind not in kinds:
            continue
        out_features, in_features = base.shape(_base_key(base, key))
        a = torch.zeros(rank, in_features)
        b = torch.zeros(out_features, rank)
        if key in by_layer_key:
            u, s, vh = factors.pop(by_layer_key[key])  # written out: the float32 factors can go
            r = min(rank, len(s))
            root = torch.sqrt(s[:r])
            b[:, :r] = u[:, :r] * root
            a[:r] = root[:, None] * vh[:r]
        prefix = f"base_model.model.{paths[key]}"
        tensors[f"{prefix}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.to(dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    num_layers = len({int(k.split(".")[1]) for k in paths})
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # alpha / r = 1: B @ A is the truncated difference itself
        lora_dropout=0.0,
        target_modules=kinds,
        layers_to_transform=layers if len(layers) < num_layers else None,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    config.save_pretrained(str(out))
    data = json.loads((out / "adapter_config.json").read_text())
    for key in ("target_modules", "layers_to_transform"):
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    (out / "adapter_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _base_key(base: Checkpoint, layer: str) -> str:
    for key in base.names():
        if key.endswith(".weight") and layer_key(key.removesuffix(".weight")) == layer:
            return key
    raise KeyError(layer)


def module_paths(base_dir: Path) -> dict[str, str]:
    """{"layers.N.<module>": the module's path in transformers' model} for every linear module in the decoder.

    Built on the meta device from config.json (no weights read), so the adapter's keys are the ones
    PEFT gives a LoRA trained on this base, whatever the checkpoint's own naming.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    paths = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = layer_key(name)
            if key is not None:
                paths[key] = name
    return paths
