"""The classic four-method comparison, measured: TuneDock's trainer vs a plain transformers+peft loop.

    .venv/bin/python -m bench.trainer_methods [--base DIR] [--data FILE.jsonl] [--steps 30]
    .venv/bin/python -m bench.trainer_methods --make-base llama-1.1b --seq 1024 --batch 8   # on a GPU

For each method (full, freeze, lora, qlora) and each implementation, one fresh subprocess
(so peak memory is that run's alone) trains for the same steps on the same batches:
- `tunedock`: services.trainer.worker.training.recipe.train, the flow the trainer service runs;
- `raw`: a plain loop written the way the peft docs show it (AdamW, model(**batch).loss,
  backward, step), on the same model, data, dtype and batches.
Prints trainable params, peak memory (CUDA max allocated, or process peak RSS on the CPU),
tokens/s (real tokens, after one warm-up step), wall time, final train/eval loss and artifact
size, with TuneDock/raw ratios; writes bench/results/trainer_methods.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench._common import ROOT, print_table, write_json

METHODS = ("full", "freeze", "lora", "qlora")
SHAPES = {  # random-init Llama shapes, as in shared/anchors/methods_baseline.py
    "llama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def make_base(shape: str, cache: Path) -> Path:
    """A random-init model of a real shape with the tiny tokenizer (no hub needed)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunedock.tiny_model import build_tiny_model

    target = cache / f"random-{shape}"
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model())
    config = LlamaConfig(
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def one_run(args) -> dict:
    """Runs in its own process: one method, one implementation."""
    import torch

    from services.trainer.config import TrainConfig
    from services.trainer.data.records import parse_dataset
    from services.trainer.worker.training import recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    examples = parse_dataset(Path(args.data).read_bytes()).examples
    evals = examples[: max(1, len(examples) // 5)]
    cfg = TrainConfig(
        base_model=args.base,
        method=args.method,
        dataset_ids=["bench"],
        max_steps=args.steps,
        batch_size=args.batch,
        max_seq_length=args.seq,
        learning_rate=args.lr,
        log_every_steps=1,
        lora_r=16,
        lora_alpha=32,
        trainable_layers=2,
        gradient_checkpointing=args.grad_ckpt,
        lr_schedule="constant",
        max_grad_norm=-1.0,
    )
    work = Path(args.work) / f"{args.impl}-{args.method}"
    started = time.perf_counter()
    if args.impl == "tunedock":
        from services.trainer.worker.training.distributed import Dist
        from services.trainer.worker.training.events import Progress

        steps: list[Progress] = []
        result = recipe.train(
            cfg,
            examples,
            evals,
            recipe.RunContext(
                work / "ckpt",
                work / "out",
                report=lambda event: steps.append(event) if isinstance(event, Progress) else None,
                dist=Dist(device=device),
            ),
        )
        # tokens/s after the first (warm-up) step, from the per-step reports
        timed = steps[1:] or steps
        rate = sum(s.tokens_per_second for s in timed) / len(timed)
        return {
            "trainable": int(result.metrics["trainable_params"]),
            "peak_bytes": int(result.metrics["peak_memory_bytes"]),
            "tokens_per_s": rate,
            "wall_s": time.perf_counter() - started,
            "train_loss": result.metrics["train_loss"],
            "eval_loss": result.metrics.get("eval_loss"),
            "artifact_bytes": dir_size(result.output_dir),
        }
    return raw_loop(cfg, examples, evals, device, work, started)


def raw_loop(cfg, examples, evals, device, work: Path, started: float) -> dict:
    """The plain transformers+peft loop the trainer is held against."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer.worker.training.batches import BatchPlan
    from services.trainer.worker.training.memory import peak_memory_bytes
    from services.trainer.worker.training.recipe import tokenize_examples

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if cfg.method == "qlora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base_model,
            quantization_config=q,
            dtype=torch.bfloat16,
            device_map={"": 0} if device == "cuda" else "cpu",
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    else:
        dtype = torch.bfloat16 if (cfg.method == "lora" and device == "cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype).to(device)
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
            )
        elif cfg.method == "freeze":
            n = model.config.num_hidden_layers
            for name, p in model.named_parameters():
                p.requires_grad = any(f"layers.{i}." in name for i in range(n - 2, n))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, fused=device == "cuda")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def plan(items, name):
        store, _ = tokenize_examples(items, tokenizer, cfg.max_seq_length, work / name, lambda message: None)
        return BatchPlan.build(store, cfg.batch_size, cfg.max_seq_length, cfg.packing, pad)

    train_plan = plan(examples, "raw-train")
    batches = [train_plan.batch(i) for i in range(len(train_plan))]
    model.train()
    tokens, timed_s, loss = 0, 0.0, None
    for step in range(cfg.max_steps):
        batch = batches[step % len(batches)].to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch.model_inputs()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # first step is warm-up
            timed_s += time.perf_counter() - t
            tokens += batch.real_tokens
    model.eval()
    eval_plan = plan(evals, "raw-eval")
    eval_batches = [eval_plan.batch(i) for i in range(len(eval_plan))]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        eval_loss = sum(float(model(**b.to(device).model_inputs()).loss) for b in eval_batches) / len(eval_batches)
    out = work / "raw-out"
    model.save_pretrained(out)
    return {
        "trainable": sum(p.numel() for p in params),
        "peak_bytes": peak_memory_bytes(device),
        "tokens_per_s": tokens / timed_s if timed_s else 0.0,
        "wall_s": time.perf_counter() - started,
        "train_loss": float(loss),
        "eval_loss": eval_loss,
        "artifact_bytes": dir_size(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="model directory (default: the tiny model)")
    parser.add_argument("--make-base", choices=sorted(SHAPES), help="build and use a random-init model of this shape")
    parser.add_argument("--data", default=str(ROOT / "tunedock" / "data" / "demo_pirate.jsonl"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work", default="/tmp/tunedock-bench-trainer")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return
    if args.make_base:
        args.base = str(make_base(args.make_base, Path(args.work) / "bases"))
    if not args.base:
        from tunedock.tiny_model import build_tiny_model

        args.base = str(build_tiny_model())
    results = []
    for method in args.methods.split(","):
        for impl in ("raw", "tunedock"):
            cmd = [
                sys.executable,
                "-m",
                "bench.trainer_methods",
                "--one",
                "--method",
                method,
                "--impl",
                impl,
                "--base",
                args.base,
                "--data",
                args.data,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--lr",
                str(args.lr),
                "--work",
                args.work,
            ]
            if args.grad_ckpt:
                cmd.append("--grad-ckpt")
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            record = {"method": method, "impl": impl}
            if line is None:
                record["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            else:
                record.update(json.loads(line[7:]))
            results.append(record)
            print(f"{method:6} {impl:8} {record.get('error') or 'ok'}", flush=True)
    rows = []
    by = {(r["method"], r["impl"]): r for r in results}
    for method in args.methods.split(","):
        raw, ours = by[(method, "raw")], by[(method, "tunedock")]
        if "error" in raw or "error" in ours:
            rows.append([method, "error", raw.get("error", ""), ours.get("error", ""), "", "", "", "", ""])
            continue
        rows.append(
            [
                method,
                f"{ours['trainable']:,}",
                f"{ours['peak_bytes'] / 2**20:,.0f} ({ours['peak_bytes'] / raw['peak_bytes']:.2f}x)",
                f"{ours['tokens_per_s']:,.0f} ({ours['tokens_per_s'] / raw['tokens_per_s']:.2f}x)",
                f"{ours['wall_s']:.1f} ({raw['wall_s']:.1f})",
                f"{ours['train_loss']:.3f} ({raw['train_loss']:.3f})",
                f"{ours['eval_loss']:.3f} ({raw['eval_loss']:.3f})",
                f"{ours['artifact_bytes'] / 2**20:,.2f}",
                "yes" if method in ("lora", "qlora") else "as its own model",
            ]
        )
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print_table(
        f"Four methods on {Path(args.base).name}, {args.steps} steps x {args.batch} x <= {args.seq} tokens, {device}; "
        "TuneDock (raw transformers+peft loop)",
        [
            "method",
            "trainable params",
            "peak MiB (vs raw)",
            "tokens/s (vs raw)",
            "wall s (raw)",
            "train loss (raw)",
            "eval loss (raw)",
            "artifact MiB",
            "hot-swaps",
        ],
        rows,
    )
    write_json(
        "trainer_methods",
        {
            "base": args.base,
            "device": device,
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "runs": results,
        },
    )


if __name__ == "__main__":
    main()
