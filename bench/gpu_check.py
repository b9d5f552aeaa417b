"""The trainer on one GPU, in one command: each method beside the raw transformers+peft loop, same run.

    bench/gpu_check.sh                   # on the GPU machine (no network: wheels from .whl/)
    bench/gpu_check.sh --fetch-wheels    # here, beforehand: what the GPU image lacks

Runs, each in its own process (peak memory is that run's alone), on random-init Llama shapes
(no hub) with the anchors' batches (shared/anchors/):
- TinyLlama's 1.1B shape, 8 x 1024 tokens: full, freeze, lora, qlora;
- Llama-3-8B's shape, 4 x 1024 tokens, gradient checkpointing: lora and qlora, and full
  (TuneDock only: the raw loop's fp32 AdamW does not fit 80 GB).
Targets: LoRA 8B >= 1.5x the raw loop's tokens/s, QLoRA 8B peak <= 8 GiB, Full 8B trains.
Prints a table and writes bench/results/gpu_check.json with tokens/s, peak memory and the
ratio to the raw loop per method.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench._common import ROOT, print_table, write_json
from bench.trainer_methods import make_base

RUNS = [
    ("llama-1.1b", "full", 8, False),
    ("llama-1.1b", "freeze", 8, False),
    ("llama-1.1b", "lora", 8, False),
    ("llama-1.1b", "qlora", 8, False),
    ("llama-8b", "lora", 4, True),
    ("llama-8b", "qlora", 4, True),
    ("llama-8b", "full", 4, True),
]
NO_RAW = {("llama-8b", "full")}
TARGETS = {
    "LoRA 8B >= 1.5x raw tokens/s": (
        ("llama-8b", "lora"),
        lambda ours, raw: ours["tokens_per_s"] / raw["tokens_per_s"] >= 1.5,
    ),
    "QLoRA 8B peak <= 8 GiB": (("llama-8b", "qlora"), lambda ours, raw: ours["peak_bytes"] <= 8 * 2**30),
    "Full 8B trains on one GPU": (("llama-8b", "full"), lambda ours, raw: "error" not in ours),
}


def synthetic_data(path: Path, seq: int, n: int = 64) -> Path:
    """Text records long enough to fill `seq` tokens each (so no batch has padding)."""
    words = (ROOT / "tunedock" / "data" / "tiny_corpus.txt").read_text().split()
    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(n):
            out.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq * 2))}) + "\n")
    return path


def one(shape: str, method: str, impl: str, base: Path, data: Path, batch: int, ckpt: bool, args) -> dict:
    cmd = [
        sys.executable, "-m", "bench.trainer_methods", "--one", "--method", method, "--impl", impl,
        "--base", str(base), "--data", str(data), "--steps", str(args.steps), "--batch", str(batch),
        "--seq", str(args.seq), "--lr", "1e-4", "--work", str(Path(args.work) / shape),
    ]  # fmt: skip
    if ckpt:
        cmd.append("--grad-ckpt")
    started = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    record = {"shape": shape, "method": method, "impl": impl, "process_s": time.perf_counter() - started}
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        record["error"] = "out of memory" if "OutOfMemory" in proc.stderr else tail[:300]
    else:
        record.update(json.loads(line[7:]))
    outcome = record.get("error") or f"{record['tokens_per_s']:,.0f} tok/s"
    print(f"{shape:10} {method:6} {impl:8} {outcome}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/tunedock-gpu-check")
    parser.add_argument("--only", default="", help="comma-separated shapes (llama-1.1b, llama-8b)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(work / "data.jsonl", args.seq)
    results = []
    for shape, method, batch, ckpt in RUNS:
        if args.only and shape not in args.only.split(","):
            continue
        base = make_base(shape, work / "bases")
        for impl in ("raw", "tunedock"):
            if impl == "raw" and (shape, method) in NO_RAW:
                continue
            results.append(one(shape, method, impl, base, data, batch, ckpt, args))
    by = {(r["shape"], r["method"], r["impl"]): r for r in results}
    rows = []
    for shape, method, batch, ckpt in RUNS:
        ours, raw = by.get((shape, method, "tunedock")), by.get((shape, method, "raw"))
        if ours is None:
            continue
        if raw is not None and "error" not in raw and "error" not in ours:
            ours["tokens_ratio"] = ours["tokens_per_s"] / raw["tokens_per_s"]
            ours["peak_ratio"] = ours["peak_bytes"] / raw["peak_bytes"]

        def cell(record, key, fmt):
            return "-" if record is None else record.get("error") or fmt(record[key])

        rate, gib = (lambda v: f"{v:,.0f}"), (lambda v: f"{v / 2**30:.2f}")
        rows.append([
            shape, method, f"{batch} x {args.seq}" + (" (ckpt)" if ckpt else ""),
            cell(ours, "tokens_per_s", rate), cell(raw, "tokens_per_s", rate),
            f"{ours['tokens_ratio']:.2f}x" if "tokens_ratio" in ours else "-",
            cell(ours, "peak_bytes", gib), cell(raw, "peak_bytes", gib),
        ])  # fmt: skip
    verdicts = {}
    for name, (key, check) in TARGETS.items():
        ours, raw = by.get((*key, "tunedock")), by.get((*key, "raw"))
        try:
            verdicts[name] = bool(ours and check(ours, raw or {}))
        except (KeyError, TypeError, ZeroDivisionError):
            verdicts[name] = False
    device = torch.cuda.get_device_name(0)
    print_table(
        f"TuneDock vs the raw transformers+peft loop on {device}, {args.steps} steps",
        ["shape", "method", "batch", "tokens/s", "raw tokens/s", "ratio", "peak GiB", "raw peak GiB"],
        rows,
    )
    for name, ok in verdicts.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    summary = {"device": device, "steps": args.steps, "seq": args.seq, "runs": results, "targets": verdicts}
    write_json("gpu_check", summary)


if __name__ == "__main__":
    main()
