"""Regenerate the checked-in Python stubs under tunedock/v1/ from protos/.

One command, no hand edits:  python scripts/gen_protos.py
`--check` regenerates into a temporary directory and exits 1 if anything differs
(the test suite runs this, so stale stubs fail CI).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("tunedock") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / PACKAGE_DIR).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        names = {p.name for p in generated}
        target = ROOT / PACKAGE_DIR
        existing = {p.name for p in target.glob("*_pb2*.py*")}
        if args.check:
            stale = sorted(
                n
                for n in names | existing
                if n not in names
                or n not in existing
                or not filecmp.cmp(Path(tmp) / PACKAGE_DIR / n, target / n, shallow=False)
            )
            if stale:
                print("stale generated stubs: " + ", ".join(stale) + "; run: python scripts/gen_protos.py")
                return 1
            print(f"{len(names)} generated files are up to date")
            return 0
        for name in existing - names:
            (target / name).unlink()
        for path in generated:
            shutil.copyfile(path, target / path.name)
        print(f"wrote {len(generated)} files to {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
