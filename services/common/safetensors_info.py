"""safetensors headers without loading a tensor (no torch): names, dtypes, shapes.

The safetensors library reads and checks the header (its offsets must tile the data exactly,
so a truncated or padded file is refused) through its numpy front end, which needs no torch.
"""

from __future__ import annotations

from pathlib import Path


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
