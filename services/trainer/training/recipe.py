"""One training flow for Full, Freeze, LoRA and QLoRA; the method is a switch, not a subclass.

Read top to bottom: seed -> tokenizer and data -> model for the method -> optimizer and
schedule -> (resume) -> loop with accumulation, clipping, logging, eval, checkpoints ->
output artifact. QLoRA is LoRA on a 4-bit base; Freeze is Full with most parameters frozen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.trainer.config import TrainConfig
from services.trainer.data.records import Example
from services.trainer.training.distributed import Dist, unwrap, wrap
from services.trainer.training.memory import TensorMemory
from services.trainer.training.tokenize import Batch, pack_rows, packed_batch, pad_batch, tokenize_example
from services.trainer.validation import freeze_selection
from tunedock.fingerprint import fingerprint_model_dir

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """How a run talks to the outside world (the worker wires these to gRPC)."""

    checkpoint_dir: Path
    output_dir: Path
    report: Callable[[str, dict], None] = lambda kind, fields: None
    should_stop: Callable[[], bool] = lambda: False
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dist: Dist = field(default_factory=Dist)
    """This process's rank among torchrun's processes; only rank 0 reports, checkpoints and saves."""


@dataclass
class RunResult:
    output_dir: Path
    kind: str  # lora_adapter | model | delta
    metrics: dict[str, float] = field(default_factory=dict)
    expanded_dir: Path | None = None
    model: object = None  # the trained model, for callers in the same process (tests)
    stopped: bool = False


# ---------------------------------------------------------------------------------------- model


def load_model(cfg: TrainConfig, device: str):
    """The base model prepared for the method; returns (model, trainable parameter names)."""
    from transformers import AutoModelForCausalLM

    on_cuda = device.startswith("cuda")
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
        )
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base_model,
            quantization_config=quant,
            dtype=getattr(torch, cfg.compute_dtype),
            device_map={"": torch.device(device)} if on_cuda else "cpu",
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        keep_4bit_training_layout(model)
    else:
        # fp32 master weights (bf16 autocast on CUDA); LoRA's frozen base can be bf16 on CUDA.
        dtype = torch.bfloat16 if (cfg.method == "lora" and on_cuda) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype).to(device)

    if cfg.is_lora:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=targets,
                use_rslora=cfg.use_rslora,
                task_type="CAUSAL_LM",
                bias="none",
            ),
        )
    elif cfg.method == "freeze":
        names = [n for n, _ in model.named_parameters()]
        chosen = freeze_selection(names, model.config.num_hidden_layers, cfg)
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model, [n for n, p in model.named_parameters() if p.requires_grad]


def keep_4bit_training_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the 4-bit modules.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode converts its weight, once and in
    place, to an inference layout: double quantization is undone and matmuls go through
    `gemv_4bit`, which has no backward. After a mid-run eval, gradients would silently stop
    flowing through the frozen base, and the base would no longer be what the job says it is.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def build_optimizer(cfg: TrainConfig, params, device: str, report) -> torch.optim.Optimizer:
    name = cfg.optimizer or ("paged_adamw_8bit" if cfg.method == "qlora" and cfg.paged_optimizer else "adamw")
    if name.startswith("paged") and not device.startswith("cuda"):
        report("log", {"message": f"{name} needs CUDA; using torch AdamW on {device}"})
        name = "adamw"
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if name == "sgd":
        return torch.optim.SGD(params, momentum=0.9, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, fused=device.startswith("cuda"), **kwargs)
    import bitsandbytes as bnb

    return {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name](params, **kwargs)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ------------------------------------------------------------------------------------------ data


def make_batches(examples: list[Example], tokenizer, cfg: TrainConfig, dist: Dist | None = None) -> list[Batch]:
    """Global batches of `batch_size x world size` rows, each cut to this process's share of rows.

    Every rank builds the same global batches, so the split is the same whatever the
    number of processes; a final global batch with fewer rows than processes is dropped
    (every process must take part in every step).
    """
    dist = dist or Dist()
    size = cfg.batch_size * dist.world_size
    tokenized = [tokenize_example(tokenizer, e, cfg.max_seq_length) for e in examples]
    tokenized = [t for t in tokenized if t.loss_tokens > 0]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.packing:
        rows = pack_rows(tokenized, cfg.max_seq_length)
        batches = [packed_batch(rows[i : i + size], pad_id) for i in range(0, len(rows), size)]
    else:
        batches = [pad_batch(tokenized[i : i + size], pad_id) for i in range(0, len(tokenized), size)]
    if not dist.enabled:
        return batches
    return [b.select(dist.rows(b.rows)) for b in batches if b.rows >= dist.world_size]


def epoch_order(n_batches: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_batches))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


# ------------------------------------------------------------------------------------------ run


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evaluate(model, batches: list[Batch], device: str, autocast, dist: Dist) -> float:
    """Mean loss per token over all processes' eval rows."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for batch in batches:
            n = batch.loss_tokens
            total += float(model(**batch.to(device).model_inputs()).loss) * n
            count += n
    model.train()
    return dist.sum(total) / max(dist.sum(count), 1)


def train(cfg: TrainConfig, train_examples: list[Example], eval_examples: list[Example], ctx: RunContext) -> RunResult:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    device, dist = ctx.device, ctx.dist
    on_cuda = device.startswith("cuda")
    report = ctx.report if dist.is_primary else (lambda kind, fields: None)
    # What the process holds before any model byte (the Python/torch runtime); 0 on CUDA.
    runtime_bytes = 0 if on_cuda else peak_memory_bytes(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    model, trainable_names = load_model(cfg, device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    report("log", {"message": f"{cfg.method}: {n_trainable:,} of {n_total:,} parameters train"})
    if dist.enabled:
        report("log", {"message": f"{dist.world_size} processes; global batch {cfg.batch_size * dist.world_size}"})

    train_batches = make_batches(train_examples, tokenizer, cfg, dist)
    eval_batches = make_batches(eval_examples, tokenizer, cfg, dist) if eval_examples else []
    if not train_batches:
        raise ValueError(
            "no training example has a token to learn from after truncation (raise max_seq_length), "
            "or fewer examples than processes"
        )
    per_epoch = max(1, len(train_batches) // cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))

    tensor_memory = TensorMemory(model)
    # FSDP shards a Full fine-tune's parameters, gradients and optimizer state over GPUs; else DDP.
    # (TUNEDOCK_FSDP_ON_CPU=1 takes the FSDP path on CPUs too, which is how tests cover it.)
    sharded = dist.enabled and cfg.method == "full" and (on_cuda or os.environ.get("TUNEDOCK_FSDP_ON_CPU") == "1")
    model = wrap(model, dist, device, full_sharded=sharded)
    if sharded and cfg.checkpoint_every_steps:
        report("log", {"message": "FSDP: intermediate checkpoints are not written; a new attempt starts over"})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable, device, report)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    step = _resume(ctx.checkpoint_dir, unwrap(model), optimizer, scheduler, report)

    def autocast():
        if on_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def no_sync(last: bool):
        # DDP all-reduces gradients in backward; only the last micro-batch of a step needs to.
        return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()

    model.train()
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    last_loss = float("nan")
    eval_loss = None
    stopped = False
    while step < total_steps:
        if dist.any(ctx.should_stop()):
            stopped = True
            break
        grad_norm = 0.0
        step_batches = []
        for micro in range(cfg.gradient_accumulation_steps):
            epoch, position = divmod(step * cfg.gradient_accumulation_steps + micro, len(train_batches))
            step_batches.append(train_batches[epoch_order(len(train_batches), cfg.seed, epoch)[position]])
        # The loss is a sum over the step's tokens divided by their count over all micro-batches
        # and processes: the same objective whatever the accumulation and number of processes.
        step_tokens = torch.tensor(dist.sum(sum(b.loss_tokens for b in step_batches)), device=device)
        step_loss = 0.0
        for i, batch in enumerate(step_batches):
            batch = batch.to(device)
            with no_sync(i == len(step_batches) - 1):
                with autocast(), tensor_memory.saving():
                    loss = model(**batch.model_inputs(), num_items_in_batch=step_tokens).loss
                tensor_memory.end_forward()
                (loss * dist.loss_scale).backward()
            step_loss += float(loss.detach())
            window_tokens += batch.real_tokens
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = dist.sum(step_loss)
        window_loss += last_loss
        window_steps += 1

        if step % cfg.log_every_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            rate = dist.sum(window_tokens) / elapsed if elapsed > 0 else 0.0
            steps_per_s = window_steps / elapsed if elapsed > 0 else 0.0
            report(
                "progress",
                {
                    "step": step,
                    "total_steps": total_steps,
                    "epoch": step * cfg.gradient_accumulation_steps / len(train_batches),
                    "loss": window_loss / window_steps,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_second": rate,
                    "peak_memory_bytes": peak_memory_bytes(device),
                    "eta_s": (total_steps - step) / steps_per_s if steps_per_s else 0.0,
                },
            )
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        if eval_batches and cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and step < total_steps:
            eval_loss = evaluate(eval_model(model), eval_batches, device, autocast, dist)
            report("eval", {"step": step, "eval_loss": eval_loss})
        if not sharded and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < total_steps:
            if dist.is_primary:
                path = _save_checkpoint(ctx.checkpoint_dir, step, unwrap(model), optimizer, scheduler)
                report("checkpoint", {"step": step, "path": str(path)})
            dist.barrier()

    if stopped:
        return RunResult(ctx.output_dir, "", stopped=True, model=unwrap(model))
    if eval_batches:
        eval_loss = evaluate(eval_model(model), eval_batches, device, autocast, dist)
        report("eval", {"step": step, "eval_loss": eval_loss})

    metrics = {
        "train_loss": last_loss,
        "trainable_params": float(n_trainable),
        "total_params": float(n_total),
        "peak_memory_bytes": float(peak_memory_bytes(device)),
        # CUDA: the allocator's peak; CPU: tensors counted exactly (RSS is mostly the runtime there).
        "training_memory_bytes": float(peak_memory_bytes(device) if on_cuda else tensor_memory.peak_bytes(optimizer)),
        "runtime_memory_bytes": float(runtime_bytes),
        "wall_time_s": time.perf_counter() - started,
        "steps": float(step),
    }
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
    if dist.enabled:
        metrics["processes"] = float(dist.world_size)
    state = full_state_dict(model) if sharded else None
    if not dist.is_primary:
        return RunResult(ctx.output_dir, "", metrics, model=unwrap(model))
    kind, expanded = save_output(cfg, unwrap(model), tokenizer, trainable_names, ctx.output_dir, state)
    return RunResult(ctx.output_dir, kind, metrics, expanded, model=unwrap(model))


def eval_model(model):
    """DDP's forward syncs buffers (every rank must call it equally often); eval needs none of that."""
    return unwrap(model) if hasattr(model, "module") else model


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """FSDP: gather the sharded parameters into full tensors on the CPU (a collective: all ranks call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(directory: Path, step: int, model, optimizer, scheduler) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    target = directory / f"step-{step:08d}.pt"
    tmp = target.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, target)  # a worker killed mid-save leaves the previous checkpoint intact
    for old in sorted(directory.glob("step-*.pt"))[:-2]:
        old.unlink()
    return target


def _resume(directory: Path, model, optimizer, scheduler, report) -> int:
    checkpoints = sorted(directory.glob("step-*.pt")) if directory.exists() else []
    if not checkpoints:
        return 0
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    report("log", {"message": f"resumed from checkpoint at step {state['step']}"})
    return int(state["step"])


# ------------------------------------------------------------------------------------ output


def save_output(
    cfg: TrainConfig, model, tokenizer, trainable_names: list[str], out: Path, state: dict | None = None
) -> tuple[str, Path | None]:
    """Write the method's artifact into `out`; returns (registry kind, expanded model dir or None).

    `state` is a gathered full state dict when the model's parameters are sharded (FSDP).
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if cfg.is_lora:
        model.save_pretrained(out)
        # QLoRA trains on a 4-bit view of the base, but serves on the full-precision base it came from.
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = cfg.base_model
        config_path.write_text(json.dumps(config, indent=2))
        return "lora_adapter", None
    if cfg.method == "full":
        model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
        return "model", None
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    save_file(
        {n: params[n].detach().contiguous().cpu() for n in sorted(trainable_names)}, str(out / "delta.safetensors")
    )
    base = Path(cfg.base_model)
    (out / "delta_config.json").write_text(
        json.dumps(
            {
                "format": "tunedock-delta-v1",
                "base_model": cfg.base_model,
                "base_fingerprint": fingerprint_model_dir(base) if base.is_dir() else "",
                "tensors": sorted(trainable_names),
            },
            indent=2,
        )
    )
    expanded = None
    if cfg.publish_expanded:
        expanded = out.parent / (out.name + "-expanded")
        if expanded.exists():
            shutil.rmtree(expanded)
        model.save_pretrained(expanded)
        tokenizer.save_pretrained(expanded)
    return "delta", expanded


def expand_delta(delta_dir: Path, base_model: str, out: Path) -> Path:
    """Apply a Freeze delta over its base and save the full model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    delta = load_file(str(Path(delta_dir) / "delta.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise ValueError(f"delta tensors {unknown[:3]} do not exist in base {base_model}")
    with torch.no_grad():
        for name, tensor in delta.items():
            params[name].copy_(tensor)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out)
    return out
