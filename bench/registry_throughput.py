"""Registry throughput: gRPC upload/download vs a plain file copy, small-adapter rate, resolve latency.

    .venv/bin/python -m bench.registry_throughput [--big-mb 256] [--small 1000] [--versions 10000]

Everything runs on loopback against a registry subprocess (SQLite + local blobs under a
temporary directory on the same disk as the baseline copies). Prints a table and writes
bench/results/registry_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

from bench._common import print_table, start_service, write_json
from tunedock.client import RegistryClient


def make_model_dir(root: Path, size_mb: int) -> Path:
    """A `model` artifact: config.json and one safetensors file holding a single U8 tensor."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "bench"}))
    n = size_mb * 1024 * 1024
    header = json.dumps({"blob": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    with (root / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        block = bytes(range(256)) * 4096  # 1 MiB, not all zeros
        for _ in range(size_mb):
            fh.write(block)
    return root


def make_adapter_dir(root: Path, index: int) -> Path:
    """A tiny but valid LoRA adapter (r=2, one module), unique per index."""
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
                "base_model_name_or_path": "x",
                "index": index,
            }
        )
    )
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": [2, 64],
        "base_model.model.layers.0.q_proj.lora_B.weight": [64, 2],
    }
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = shape[0] * shape[1] * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    payload = struct.pack("<I", index) * (offset // 4)
    (root / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + payload)
    return root


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=int, default=256)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--versions", type=int, default=10000)
    parser.add_argument("--resolves", type=int, default=2000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tunedock-bench-"))
    proc, address = start_service("adapter_registry", work / "registry", "--max-artifact-mb", str(args.big_mb + 64))
    rows, results = [], {}
    try:
        client = RegistryClient(address, timeout=600)
        # --- one big artifact -------------------------------------------------------------
        big = make_model_dir(work / "big", args.big_mb)
        nbytes = dir_bytes(big)
        mb = nbytes / 2**20
        copy_s, _ = timed(lambda: shutil.copytree(big, work / "big-copy"))
        up_s, _ = timed(lambda: client.publish_dir(big, "big-model", kind="model"))
        down_s, _ = timed(lambda: client.download("big-model:1", work / "big-down"))
        assert (work / "big-down" / "model.safetensors").stat().st_size == (big / "model.safetensors").stat().st_size
        results["big"] = {"bytes": nbytes, "copy_s": copy_s, "upload_s": up_s, "download_s": down_s}
        rows += [
            [f"{args.big_mb} MiB artifact", "plain file copy (baseline)", f"{mb / copy_s:,.0f} MB/s", "1.00x"],
            ["", "gRPC publish (hash + validate + commit)", f"{mb / up_s:,.0f} MB/s", f"{copy_s / up_s:.2f}x"],
            ["", "gRPC download (verified)", f"{mb / down_s:,.0f} MB/s", f"{copy_s / down_s:.2f}x"],
        ]
        # --- many small adapters ----------------------------------------------------------
        small_root = work / "small"
        dirs = [make_adapter_dir(small_root / f"a{i}", i) for i in range(args.small)]
        small_bytes = sum(dir_bytes(d) for d in dirs)
        copy_s, _ = timed(lambda: shutil.copytree(small_root, work / "small-copy"))
        up_s, _ = timed(lambda: [client.publish_dir(d, f"small-{i}") for i, d in enumerate(dirs)])
        down_s, _ = timed(
            lambda: [client.download(f"small-{i}", work / "small-down" / str(i)) for i in range(args.small)]
        )
        results["small"] = {
            "count": args.small,
            "bytes": small_bytes,
            "copy_s": copy_s,
            "upload_s": up_s,
            "download_s": down_s,
        }
        rows += [
            [
                f"{args.small} small adapters",
                "plain file copy (baseline)",
                f"{args.small / copy_s:,.0f} adapters/s",
                "1.00x",
            ],
            ["", "gRPC publish, one by one", f"{args.small / up_s:,.0f} adapters/s", f"{copy_s / up_s:.3f}x"],
            ["", "gRPC download, one by one", f"{args.small / down_s:,.0f} adapters/s", f"{copy_s / down_s:.3f}x"],
        ]
        # --- resolve latency with many versions --------------------------------------------
        stored = 1 + args.small
        extra = max(0, args.versions - stored)
        fill_s, _ = timed(lambda: fill_versions(work / "registry", extra))
        names = [f"small-{i}" for i in range(args.small)]
        latencies = []
        for i in range(args.resolves):
            ref = names[i % len(names)] if i % 2 else f"filler:{1 + (i * 7919) % max(extra, 1)}"
            start = time.perf_counter()
            client.resolve(ref if extra or i % 2 else names[0])
            latencies.append((time.perf_counter() - start) * 1e3)
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        results["resolve"] = {
            "versions_stored": stored + extra,
            "calls": args.resolves,
            "p50_ms": p50,
            "p99_ms": p99,
            "fill_s": fill_s,
        }
        rows.append(
            [
                f"resolve, {stored + extra:,} versions stored",
                f"{args.resolves} calls",
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                "",
            ]
        )
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print_table("Registry throughput (loopback, SQLite + local blobs)", ["workload", "path", "rate", "vs copy"], rows)
    write_json("registry_throughput", results)


def fill_versions(registry_dir: Path, count: int) -> None:
    """Store `count` more versions straight through the metadata store (no blobs needed to resolve)."""
    if count <= 0:
        return
    from services.adapter_registry.domain import NewVersion, StoredFile
    from services.adapter_registry.metadata import MetadataStore

    store = MetadataStore(f"sqlite:///{registry_dir / 'registry' / 'registry.db'}")
    for i in range(count):
        sha = f"{i:064x}"
        store.add_version(
            NewVersion(name="filler", kind="lora_adapter", files=(StoredFile("w.bin", 1, sha),), lineage={}, labels={})
        )
    store.close()


if __name__ == "__main__":
    main()
