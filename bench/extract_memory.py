"""Extraction memory: a 1.1B-shaped model at rank 64, streamed vs loading both models.

    .venv/bin/python -m bench.extract_memory [--layers 22] [--rank 64]

Builds a TinyLlama-1.1B-shaped base (hidden 2048, 22 layers, bf16, random weights) and a "tuned"
copy whose every linear module moved by a rank-32 change plus noise, then extracts a rank-64
LoRA adapter two ways, each in its own process:
- streamed: services.trainer.worker.training.extract (one tensor pair at a time from safetensors);
- baseline: both models loaded with transformers in float32, then the same SVDs.
Target: the streamed peak RSS stays within the two models' weight files (memory-mapped) plus
one tensor's float32 working set, the adapter it builds and the Python/torch runtime (measured
in the same process before the work); the baseline holds both models in float32. Prints a table and writes
bench/results/extract_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, print_table, write_json

BUILD = r"""
import sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from safetensors.torch import load_file, save_file
root, layers = Path(sys.argv[1]), int(sys.argv[2])
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(root / "base")
tensors = load_file(str(root / "base" / "model.safetensors"))
del model
for name, w in tensors.items():
    if w.dim() == 2 and ".layers." in name:
        out_f, in_f = w.shape
        low = torch.randn(out_f, 32) @ torch.randn(32, in_f) * 1e-3
        tensors[name] = (w.float() + low + 1e-5 * torch.randn_like(w, dtype=torch.float32)).to(torch.bfloat16)
(root / "tuned").mkdir()
save_file(tensors, str(root / "tuned" / "model.safetensors"), metadata={"format": "pt"})
(root / "tuned" / "config.json").write_text((root / "base" / "config.json").read_text())
"""

MEASURE = r"""
import json, resource, sys, threading, time
from pathlib import Path
mode, root, rank = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
peak_anon = 0
def watch():
    global peak_anon
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
import torch
from services.trainer.worker.training import extract, fidelity  # noqa: F401  (imports: the runtime, not work)
from transformers import AutoModelForCausalLM  # noqa: F401
runtime = int(open("/proc/self/statm").read().split()[1]) * 4096
started = time.perf_counter()
if mode == "streamed":
    from services.trainer.config import ExtractOptions
    from services.trainer.worker.training.extract import extract_lora
    result = extract_lora(root / "base", sorted((root / "tuned").glob("*.safetensors")), False,
                          ExtractOptions(rank=rank, max_rank=rank), root / "adapter", str(root / "base"), "bench:1")
    kept = result.retained_share
else:
    from transformers import AutoModelForCausalLM
    from services.trainer.worker.training.extract import top_singular
    base = dict(AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).named_parameters())
    tuned = dict(AutoModelForCausalLM.from_pretrained(root / "tuned", dtype=torch.float32).named_parameters())
    kept_energy = total = 0.0
    with torch.no_grad():
        for name, w in tuned.items():
            if w.dim() == 2 and ".layers." in name:
                diff = w - base[name]
                u, s, vh, _ = top_singular(diff, rank)
                kept_energy += float((s.double() ** 2).sum())
                total += float((diff.double() ** 2).sum())
    kept = kept_energy / total
elapsed = time.perf_counter() - started
time.sleep(0.05)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_anon": peak_anon,
                  "runtime_rss": runtime, "seconds": elapsed, "retained_share": kept}))
"""


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        run(BUILD, str(root), str(args.layers))
        print(f"built base and tuned models in {time.perf_counter() - started:.0f}s")
        weights = sum(f.stat().st_size for d in ("base", "tuned") for f in (root / d).glob("*.safetensors"))
        # One tensor at a time: the largest (the embedding, 32000 x 2048) as a float32 difference and one
        # float32 temporary. What the job builds: the adapter's factors at this rank, in float32.
        module = 2 * 32000 * 2048 * 4
        per_layer = 4 * (2048 + 2048) + 2 * (2048 + 5632) + (5632 + 2048)  # q k v o + gate up + down: (in + out)
        adapter = per_layer * args.layers * args.rank * 4
        results = {mode: run(MEASURE, mode, str(root), str(args.rank)) for mode in ("streamed", "baseline")}
        runtime = results["streamed"]["runtime_rss"]
        bound = runtime + weights + module + adapter
    gib = 2**30
    rows = [
        [
            mode,
            f"{r['peak_rss'] / gib:.2f}",
            f"{r['peak_anon'] / gib:.2f}",
            f"{r['seconds']:.0f}",
            f"{r['retained_share']:.4f}",
        ]
        for mode, r in results.items()
    ]
    print_table(
        f"Extraction at rank {args.rank} of a 1.1B-shaped model ({args.layers} layers, bf16); bound: the runtime "
        f"{runtime / gib:.2f} GiB + two models' weights {weights / gib:.2f} GiB + one tensor's float32 working set "
        f"{module / gib:.2f} GiB + the adapter {adapter / gib:.2f} GiB = {bound / gib:.2f} GiB",
        ["mode", "peak RSS GiB", "peak anonymous GiB", "seconds", "energy kept"],
        rows,
    )
    streamed = results["streamed"]
    met = streamed["peak_rss"] <= bound
    print(
        f"\nstreamed peak RSS {'within' if met else 'ABOVE'} the bound; baseline / streamed peak RSS: "
        f"{results['baseline']['peak_rss'] / streamed['peak_rss']:.1f}x"
    )
    write_json(
        "extract_memory",
        {
            "rank": args.rank,
            "layers": args.layers,
            "weights_bytes": weights,
            "module_bytes": module,
            "adapter_bytes": adapter,
            "runtime_bytes": runtime,
            "bound_bytes": bound,
            "target_met": met,
            **results,
        },
    )


if __name__ == "__main__":
    main()
