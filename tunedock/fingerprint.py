"""A cheap, stable fingerprint of a model directory, so adapters can tell which base they belong to.

Hashes config.json and the safetensors headers (names, dtypes, shapes, offsets) plus each
weight file's size: it changes when the architecture or the weight layout changes, and it
costs milliseconds even for a 70B model, unlike hashing every weight byte.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path


def fingerprint_model_dir(path: Path) -> str:
    """The fingerprint, or "" when `path` is not a model directory (unknown is not the hash of nothing)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return ""
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        with weights.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            digest.update(weights.name.encode())
            digest.update(fh.read(min(n, 100 * 1024 * 1024)))
        digest.update(str(weights.stat().st_size).encode())
    return digest.hexdigest()
