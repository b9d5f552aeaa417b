"""What the registry checks before a version is accepted.

Two stages: `check_manifest` before any byte is stored (names, paths, sizes, limits), and
`check_contents` on the staged files once they are complete and their checksums match
(adapter config, safetensors headers, LoRA shapes). Each refusal names the file and the
problem. Nothing here imports torch: the safetensors library reads the headers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from services.common.lora_shapes import adapter_module_shapes
from tunedock.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from tunedock.model_files import CorruptSafetensors, read_header

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
KINDS = ("lora_adapter", "model", "delta")


@dataclass(frozen=True)
class DeclaredFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class AdapterFacts:
    """What validation learned about a LoRA adapter."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    module_shapes: dict[str, list[int]]
    """{"layers.N.<module>": [in, out]} of the decoder modules it adapts."""


def check_path(path: str) -> str:
    """A plain relative POSIX path inside the artifact."""
    problem = None
    if not path:
        problem = "is empty"
    elif "\x00" in path or "\\" in path:
        problem = "contains a NUL or backslash"
    elif path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        problem = "is absolute"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        problem = "has an empty, '.' or '..' component"
    elif len(path) > 255:
        problem = "is longer than 255 characters"
    if problem:
        raise InvalidArgument(f"file path {path!r} {problem}: use a plain relative path such as 'adapter_config.json'")
    return str(PurePosixPath(path))


def check_manifest(kind: str, files: Sequence[DeclaredFile], max_bytes: int, max_files: int) -> None:
    if kind not in KINDS:
        raise InvalidArgument(f"artifact kind must be one of {', '.join(KINDS)}")
    if not files:
        raise InvalidArgument("the manifest lists no files")
    if len(files) > max_files:
        raise ResourceExhausted(f"the manifest lists {len(files)} files; the limit is {max_files}")
    seen: set[str] = set()
    total = 0
    for f in files:
        check_path(f.path)
        if f.path in seen:
            raise InvalidArgument(f"file {f.path!r} is listed twice in the manifest")
        seen.add(f.path)
        if f.size < 0:
            raise InvalidArgument(f"file {f.path!r}: size must be >= 0, got {f.size}")
        if not SHA256_RE.match(f.sha256):
            raise InvalidArgument(f"file {f.path!r}: sha256 must be 64 lowercase hex digits, got {f.sha256!r}")
        total += f.size
    if total > max_bytes:
        raise ResourceExhausted(
            f"the artifact is {total / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB (max_artifact_mb)"
        )
    required = {
        "lora_adapter": ("adapter_config.json", "adapter_model.safetensors"),
        "model": ("config.json",),
        "delta": ("delta_config.json", "delta.safetensors"),
    }[kind]
    missing = [name for name in required if name not in seen]
    if missing:
        raise FailedPrecondition(f"a {kind} artifact needs {', '.join(required)}; missing: {', '.join(missing)}")
    if kind == "model" and not any(p.endswith(".safetensors") for p in seen):
        raise FailedPrecondition("a model artifact needs its weights as *.safetensors files; none are listed")


def read_safetensors_header(path: Path, display: str) -> dict[str, dict]:
    """{tensor: {dtype, shape}} from a complete, well-formed safetensors file (checked by the library)."""
    try:
        return read_header(path)
    except CorruptSafetensors as exc:
        raise FailedPrecondition(
            f"{display}: not a complete safetensors file, it is truncated or corrupt ({exc})"
        ) from None


def _read_json(path: Path, display: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"{display}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FailedPrecondition(f"{display}: expected a JSON object")
    return data


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def check_lora_adapter(root: Path) -> AdapterFacts:
    config = _read_json(root / "adapter_config.json", "adapter_config.json")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise FailedPrecondition(
            f"adapter_config.json: peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') "
            "are accepted"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise FailedPrecondition(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise FailedPrecondition(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if not (
        isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise FailedPrecondition(
            f"adapter_config.json: target_modules must be a name list or a string, got {targets!r}"
        )
    rank_pattern = config.get("rank_pattern") or {}

    header = read_safetensors_header(root / "adapter_model.safetensors", "adapter_model.safetensors")
    listed = targets if isinstance(targets, list) else None
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, info in header.items():
        match = _LORA_KEY.match(name)
        if match is None:
            continue  # modules_to_save and other extras are allowed
        pairs.setdefault(match["module"], {})[match["ab"]] = info["shape"]
    if not pairs:
        raise FailedPrecondition("adapter_model.safetensors: holds no LoRA tensors (*.lora_A.weight / *.lora_B.weight)")
    for module, shapes in sorted(pairs.items()):
        if set(shapes) != {"A", "B"}:
            missing = "lora_B" if "A" in shapes else "lora_A"
            raise FailedPrecondition(f"adapter_model.safetensors: {module} has no {missing} tensor")
        short = module.rsplit(".", 1)[-1]
        # PEFT lists short names ("q_proj") or, for all-linear, full module paths.
        if listed is not None and short not in listed and not any(module.endswith("." + t) for t in listed):
            raise FailedPrecondition(
                f"adapter_model.safetensors: {module} is not among target_modules {sorted(targets)} in "
                "adapter_config.json"
            )
        expected_rank = next((r for key, r in rank_pattern.items() if module.endswith(key)), rank)
        a, b = shapes["A"], shapes["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != expected_rank or b[1] != expected_rank:
            raise FailedPrecondition(
                f"adapter_model.safetensors: {module} has lora_A {a} and lora_B {b}, which do not agree with "
                f"r={expected_rank} from adapter_config.json (expected lora_A [r, in] and lora_B [out, r])"
            )
    modules = tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs}))
    shapes = adapter_module_shapes(header)
    return AdapterFacts(rank, float(alpha), modules, str(config.get("base_model_name_or_path") or ""), shapes)


def check_contents(kind: str, root: Path, files: Sequence[DeclaredFile]) -> AdapterFacts | None:
    """Deep checks on complete, checksum-verified staged files."""
    if kind == "lora_adapter":
        return check_lora_adapter(root)
    if kind == "model":
        _read_json(root / "config.json", "config.json")
    else:
        config = _read_json(root / "delta_config.json", "delta_config.json")
        if not config.get("base_model"):
            raise FailedPrecondition(
                "delta_config.json: needs a 'base_model' entry naming the base the delta applies to"
            )
    for f in files:
        if f.path.endswith(".safetensors"):
            read_safetensors_header(root / f.path, f.path)
    return None
