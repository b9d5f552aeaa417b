"""Where a base model lives on this host, and its fingerprint (no torch).

Bases are named by a local directory or a hub id; a hub id is found in the local Hugging Face
cache (nothing is downloaded at run time). Both the trainer (lineage of what it publishes) and
inference (the base it serves) fingerprint the same directory, so an adapter's recorded base
and a replica's served base compare equal exactly when they are the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tunedock.fingerprint import fingerprint_model_dir


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


def base_fingerprint(base_model: str) -> str:
    """The fingerprint of a base given as a local directory or a cached hub id; "" when it is not here."""
    local = resolve_local_base(base_model)
    return fingerprint_model_dir(local) if local is not None else ""
