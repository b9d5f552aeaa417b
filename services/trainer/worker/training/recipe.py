"""One training flow for Full, Freeze, LoRA and QLoRA; the method is a switch, not a subclass.

    recipe = Recipe(cfg, ctx)
    recipe.setup(train_examples, eval_examples)   # precision, tokenizer, data, model, optimizer, resume
    finished = recipe.train()                      # steps until done or stopped; evals and checkpoints
    result = recipe.save()                         # the method's artifact and the run's metrics

QLoRA is LoRA on a 4-bit base; Freeze is Full with most parameters frozen. The pieces each step
uses live beside this file: `formatting` (chat templates, loss masks), `batches` (token storage,
padding-free packing), `model` (precision, attention, families, sharding), `loss` (chunked
linear cross-entropy), `checkpoint`, `distributed`, `memory`, `events`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.common.basemodels import base_fingerprint
from services.trainer.config import TrainConfig
from services.trainer.data.records import Example
from services.trainer.validation import freeze_selection
from services.trainer.worker.dataset_files import identity_of
from services.trainer.worker.training import checkpoint
from services.trainer.worker.training.batches import PACK_WINDOW, BatchPlan, TokenStore
from services.trainer.worker.training.distributed import Dist
from services.trainer.worker.training.events import Checkpoint, Eval, Event, Log, Progress
from services.trainer.worker.training.formatting import ChatFormatter, FormattingError, Tokenized
from services.trainer.worker.training.loss import CausalLMLoss
from services.trainer.worker.training.memory import TensorMemory, peak_memory_bytes
from services.trainer.worker.training.model import (
    DTYPES,
    LoraSpec,
    Precision,
    QuantSpec,
    add_lora,
    apply_fused_kernels,
    attention_for,
    choose_precision,
    data_parallel,
    enable_gradient_checkpointing,
    load_base,
    prepare_4bit,
    sharded_full_model,
    upcast_trainable,
)
from services.trainer.worker.training.stream import TokenCache, TokenStream, stream_key, tokenizer_identity
from tunedock.model_files import decoder_layer_prefix


@dataclass
class RunContext:
    """How a run talks to the outside world (the worker wires these to gRPC)."""

    checkpoint_dir: Path
    output_dir: Path
    report: Callable[[Event], None] = lambda event: None
    should_stop: Callable[[], bool] = lambda: False
    dist: Dist = field(default_factory=lambda: Dist(device="cuda" if torch.cuda.is_available() else "cpu"))
    """This process's place among torchrun's processes and its device; only rank 0 reports and saves."""
    token_cache_dir: Path | None = None
    """Where tokenized windows are kept for later jobs on the same data and base (the worker passes the
    node's cache); None: beside the output, for this run only."""

    @property
    def device(self) -> str:
        return self.dist.device


@dataclass
class RunResult:
    output_dir: Path
    kind: str  # lora_adapter | model | delta
    metrics: dict[str, float] = field(default_factory=dict)
    expanded_dir: Path | None = None
    model: object = None  # the trained model, for callers in the same process (tests)
    stopped: bool = False


# ------------------------------------------------------------------------------- builders


def build_precision(cfg: TrainConfig, device: str, notice) -> Precision:
    return choose_precision(cfg.compute_dtype, device, notice)


def build_optimizer(name: str, params, lr: float, weight_decay: float, device: str, notice) -> torch.optim.Optimizer:
    if name.startswith("paged") and not device.startswith("cuda"):
        notice(f"{name} needs CUDA; using torch AdamW on {device}")
        name = "adamw"
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.startswith("cuda"))
    import bitsandbytes as bnb

    optimizers = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return optimizers[name](params, lr=lr, weight_decay=weight_decay)


def default_optimizer(cfg: TrainConfig, device: str, sharded: bool) -> str:
    if cfg.optimizer:
        return cfg.optimizer
    if cfg.method == "qlora" and cfg.paged_optimizer:
        return "paged_adamw_8bit"
    if cfg.method == "full" and device.startswith("cuda") and not sharded:
        return "adamw_8bit"  # bf16 weights on one GPU: 8-bit moments (see training.model)
    return "adamw"


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def tokenize_examples(
    examples: Sequence[Example], tokenizer, max_len: int, directory: Path, notice
) -> tuple[TokenStore, int]:
    """Token storage for the examples that keep a token to learn from; returns (store, dropped).
    Streams: one example's tokens in memory at a time."""
    tokenize = learnable_tokens(ChatFormatter(tokenizer, notice), max_len)
    dropped = [0]

    def kept():
        for example in examples:
            tokenized = tokenize(example)
            if tokenized is None:
                dropped[0] += 1
            else:
                yield tokenized

    store = TokenStore.build(kept(), directory)
    return store, dropped[0]


def learnable_tokens(formatter: ChatFormatter, max_len: int) -> Callable[[Example], Tokenized | None]:
    """An example's tokens, or None when truncation left it no token to learn from."""

    def tokenize(example: Example) -> Tokenized | None:
        try:
            tokenized = formatter(example, max_len)
        except FormattingError as exc:
            raise ValueError(str(exc)) from None
        return tokenized if tokenized.loss_tokens else None

    return tokenize


# ---------------------------------------------------------------------------------- recipe


class Recipe:
    """A training run of one method (see the module doc for the order of calls)."""

    def __init__(self, cfg: TrainConfig, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.dist = ctx.dist
        self.device = ctx.device
        self.on_cuda = self.device.startswith("cuda")
        self.report = ctx.report if self.dist.is_primary else (lambda event: None)
        self.started = time.perf_counter()
        self.step = 0
        self.eval_loss: float | None = None
        self.last_loss = float("nan")
        self.trained_tokens = 0.0
        """Real (non-padding) tokens of every process's steps in this attempt (a resumed job counts from its resume)."""

    def notice(self, message: str) -> None:
        self.report(Log(message))

    # ---------------------------------------------------------------------------- setup

    def setup(self, train_examples: Sequence[Example], eval_examples: Sequence[Example]) -> None:
        cfg = self.cfg
        import peft  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        # What the process holds before any model byte (the Python/torch/transformers/peft runtime, as
        # `tunedock plan` measures it); 0 on CUDA, whose allocator peak excludes it.
        self.runtime_bytes = 0 if self.on_cuda else peak_memory_bytes(self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats()
        self.precision = build_precision(cfg, self.device, self.notice)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
        self.config = AutoConfig.from_pretrained(cfg.base_model)
        self._setup_data(train_examples, eval_examples)
        self._setup_model()
        self._setup_optimizer()
        resumed = checkpoint.resume(self.ctx.checkpoint_dir, self.module, self.optimizer, self.dist, self.sharded)
        if resumed is not None:
            self.step, extra = resumed
            self.scheduler.load_state_dict(extra["scheduler"])
            if self.scaler is not None and "scaler" in extra:
                self.scaler.load_state_dict(extra["scaler"])
            self.notice(f"resumed from checkpoint at step {self.step}")

    def _setup_data(self, train_examples: Sequence[Example], eval_examples: Sequence[Example]) -> None:
        """The training stream (tokenized a window at a time as steps reach it, cached for later jobs)
        and the eval examples (tokenized at the first evaluation)."""
        cfg, dist = self.cfg, self.dist
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.work = self.ctx.output_dir.parent / f"tokens-{dist.rank}"
        formatter = ChatFormatter(self.tokenizer, self.notice)
        identity = {
            "tokenizer": tokenizer_identity(self.tokenizer),
            "max_len": cfg.max_seq_length,
            "packing": cfg.packing,
            "seed": cfg.seed,
            "window": PACK_WINDOW,
        }
        cache_root = self.ctx.token_cache_dir or self.work / "cache"
        self.train_stream = TokenStream(
            train_examples,
            learnable_tokens(formatter, cfg.max_seq_length),
            TokenCache(cache_root, stream_key(identity, identity_of(train_examples))),
            seed=cfg.seed,
            max_len=cfg.max_seq_length,
            packing=cfg.packing,
            pad_id=self.pad_id,
            rows_per_batch=cfg.batch_size,
            world_size=dist.world_size,
            my_rows=dist.rows,
            notice=self.notice,
        )
        self.eval_examples = eval_examples
        self.eval_plan: BatchPlan | None = None
        if cfg.max_steps:
            self.train_stream.batch(0)  # one window: what the first step needs, and proof there is one
            self.total_steps = cfg.max_steps
            self.notice(
                f"{len(train_examples):,} training examples, tokenized {PACK_WINDOW:,} at a time as the "
                f"{cfg.max_steps} steps reach them"
            )
        else:
            per_epoch = max(1, self.train_stream.batches_in_epoch(0) // cfg.gradient_accumulation_steps)
            self.train_stream.batch(0)
            self.total_steps = max(1, math.ceil(cfg.epochs * per_epoch))
        if cfg.packing:
            self.notice("packing: examples end to end in one row per micro-batch, positions restart per example")

    def _eval_batches(self) -> BatchPlan:
        if self.eval_plan is None:
            store, _ = tokenize_examples(
                self.eval_examples, self.tokenizer, self.cfg.max_seq_length, self.work / "eval", self.notice
            )
            self.eval_plan = BatchPlan.build(
                store,
                self.cfg.batch_size,
                self.cfg.max_seq_length,
                self.cfg.packing,
                self.pad_id,
                self.dist.world_size,
                self.dist.rows,
            )
        return self.eval_plan

    def _setup_model(self) -> None:
        cfg, dist = self.cfg, self.dist
        attention, why = attention_for(self.config, self.device)
        self.notice(f"attention: {why}; precision: {self.precision.describe()}")
        # FSDP shards a Full fine-tune's parameters, gradients and optimizer state over GPUs; else DDP.
        # (TUNEDOCK_FSDP_ON_CPU=1 takes the FSDP path on CPUs too, which is how tests cover it.)
        self.sharded = (
            dist.enabled
            and dist.world_size > 1
            and cfg.method == "full"
            and (self.on_cuda or os.environ.get("TUNEDOCK_FSDP_ON_CPU") == "1")
        )
        if self.sharded:
            self.module = sharded_full_model(cfg.base_model, dist, attention, self.precision)
            model = self.module.model
            if cfg.gradient_checkpointing:
                enable_gradient_checkpointing(model)
        else:
            model = self._load_for_method(attention)
            self.module = CausalLMLoss(model)
        self.model = model
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.n_total = sum(p.numel() for p in model.parameters())
        self.notice(f"{cfg.method}: {self.n_trainable:,} of {self.n_total:,} parameters train")
        if dist.enabled:
            self.notice(f"{dist.world_size} processes; global batch {cfg.batch_size * dist.world_size} rows")
        self.tensor_memory = None if self.on_cuda else TensorMemory(model)
        if dist.enabled and not self.sharded:
            self.module = data_parallel(self.module, dist)
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]

    def _load_for_method(self, attention: str):
        cfg = self.cfg
        quant = None
        if cfg.method == "qlora":
            quant = QuantSpec(cfg.quant_type, cfg.double_quant, DTYPES[cfg.compute_dtype])
        # Weights that will not train are stored in the compute dtype on CUDA; a single-GPU Full run too.
        dtype = self.precision.frozen if cfg.method in ("lora", "freeze", "full") else torch.float32
        model = load_base(cfg.base_model, self.device, dtype, attention, quant)
        if self.on_cuda:
            apply_fused_kernels(model, self.notice)
        if quant is not None:
            model = prepare_4bit(model, cfg.gradient_checkpointing, autocast=self.precision.compute is not None)
        if cfg.is_lora:
            model = add_lora(
                model,
                LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.target_modules), cfg.use_rslora),
            )
        elif cfg.method == "freeze":
            names = [n for n, _ in model.named_parameters()]
            text = self.config.get_text_config()
            chosen = freeze_selection(names, text.num_hidden_layers, cfg, decoder_layer_prefix(names))
            for name, param in model.named_parameters():
                param.requires_grad_(name in chosen)
        if cfg.method != "full":
            upcast_trainable(model)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        name = default_optimizer(cfg, self.device, self.sharded)
        self.optimizer = build_optimizer(
            name, self.trainable, cfg.learning_rate, cfg.weight_decay, self.device, self.notice
        )
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.scaler else None

    # ---------------------------------------------------------------------------- train

    def train(self) -> bool:
        """Steps until the planned total (True) or until a stop request (False)."""
        cfg = self.cfg
        self.module.train()
        window = _Window(self.device)
        while self.step < self.total_steps:
            if self._stop_requested():
                return False
            loss, grad_norm, tokens = self._train_step()
            self.step += 1
            window.add(loss, grad_norm, tokens)
            if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                self._report_progress(window)
                window = _Window(self.device)
            if self._due(cfg.eval_every_steps) and len(self.eval_examples):
                self.eval_loss = self.evaluate()
                self.report(Eval(self.step, self.eval_loss))
            if self._due(cfg.checkpoint_every_steps):
                self._save_checkpoint()
        return True

    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def _stop_requested(self) -> bool:
        # One collective every 10 steps under several processes (cancel waits at most 10 steps).
        if self.dist.enabled and self.step % 10:
            return False
        return self.dist.any(self.ctx.should_stop())

    def _step_batches(self):
        accumulation = self.cfg.gradient_accumulation_steps
        for micro in range(accumulation):
            yield self.train_stream.batch(self.step * accumulation + micro)

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step; returns (loss, grad norm) as device tensors (no host sync) and tokens seen."""
        batches = list(self._step_batches())
        # The loss is a sum over the step's tokens divided by their count over all micro-batches and
        # processes: the same objective whatever the accumulation and the number of processes.
        step_tokens = self.dist.sum_(
            torch.tensor(float(sum(b.loss_tokens for b in batches)), device=self.device)
        ).clamp_min(1.0)
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with self._no_sync(last), self.precision.autocast(self.device), self._saving():
                loss = self.module(**batch.to(self.device).model_inputs()) / step_tokens
            if self.tensor_memory is not None:
                self.tensor_memory.end_forward()
            scaled = loss * self.dist.loss_scale
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            step_loss += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.zeros((), device=self.device)
        if self.cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm.detach().float(), sum(b.real_tokens for b in batches)

    def _no_sync(self, last: bool):
        # DDP all-reduces gradients in backward; only the last micro-batch of a step needs to.
        if last or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def _saving(self):
        return self.tensor_memory.saving() if self.tensor_memory is not None else contextlib.nullcontext()

    def _report_progress(self, window: _Window) -> None:
        loss, grad_norm, tokens = window.reduce(self.dist)  # the one host sync of a logging window
        self.last_loss = loss
        self.trained_tokens += tokens
        elapsed = time.perf_counter() - window.started
        steps_per_s = window.steps / elapsed if elapsed > 0 else 0.0
        self.report(
            Progress(
                step=self.step,
                total_steps=self.total_steps,
                epoch=self.train_stream.epochs_at(self.step * self.cfg.gradient_accumulation_steps - 1),
                loss=loss,
                learning_rate=self.scheduler.get_last_lr()[0],
                grad_norm=grad_norm,
                tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0,
                peak_memory_bytes=peak_memory_bytes(self.device),
                eta_s=(self.total_steps - self.step) / steps_per_s if steps_per_s else 0.0,
            )
        )

    def _save_checkpoint(self) -> None:
        extra = {"scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        target = checkpoint.save(
            self.ctx.checkpoint_dir, self.step, self.module, self.optimizer, extra, self.dist, self.sharded
        )
        self.report(Checkpoint(self.step, str(target)))

    # ------------------------------------------------------------------------- evaluate

    def evaluate(self) -> float:
        """Mean loss per token over all processes' eval rows."""
        plan = self._eval_batches()
        module = getattr(self.module, "module", self.module)  # DDP's forward syncs buffers: not needed here
        module.eval()
        total = torch.zeros((), device=self.device)
        count = 0
        with torch.no_grad(), self.precision.autocast(self.device):
            for index in range(len(plan)):
                batch = plan.batch(index)
                total += module(**batch.to(self.device).model_inputs()).float()
                count += batch.loss_tokens
        module.train()
        total_sum, count_sum = self.dist.sum(float(total), float(count))
        return total_sum / max(count_sum, 1.0)

    # ----------------------------------------------------------------------------- save

    def save(self) -> RunResult:
        """The final eval, the metrics, and (rank 0) the method's artifact in `ctx.output_dir`."""
        if len(self.eval_examples):
            self.eval_loss = self.evaluate()
            self.report(Eval(self.step, self.eval_loss))
        metrics = {
            "train_loss": self.last_loss,
            "trainable_params": float(self.n_trainable),
            "total_params": float(self.n_total),
            "peak_memory_bytes": float(peak_memory_bytes(self.device)),
            # CUDA: the allocator's peak; CPU: tensors counted exactly (RSS is mostly the runtime there).
            "training_memory_bytes": float(
                peak_memory_bytes(self.device)
                if self.tensor_memory is None
                else self.tensor_memory.peak_bytes(self.optimizer)
            ),
            "runtime_memory_bytes": float(self.runtime_bytes),
            "wall_time_s": time.perf_counter() - self.started,
            "steps": float(self.step),
            "trained_tokens": self.trained_tokens,
            # Of the training examples the run's windows held (all of them once an epoch is done).
            "examples_seen": float(self.train_stream.seen),
            "examples_truncated": float(self.train_stream.truncated),
            "examples_dropped": float(self.train_stream.dropped),
        }
        if self.eval_loss is not None:
            metrics["eval_loss"] = self.eval_loss
        if self.dist.enabled:
            metrics["processes"] = float(self.dist.world_size)
        state = _full_state_dict(self.module) if self.sharded else None  # a collective: every rank gathers
        if not self.dist.is_primary:
            return RunResult(self.ctx.output_dir, "", metrics, model=self.model)
        kind, expanded = save_output(
            self.cfg, self.model, self.tokenizer, self.trainable_names, self.ctx.output_dir, state
        )
        return RunResult(self.ctx.output_dir, kind, metrics, expanded, model=self.model)

    def stopped(self) -> RunResult:
        return RunResult(self.ctx.output_dir, "", stopped=True, model=self.model)


def train(
    cfg: TrainConfig, train_examples: Sequence[Example], eval_examples: Sequence[Example], ctx: RunContext
) -> RunResult:
    """The whole run: setup, train, save (or stop when asked)."""
    recipe = Recipe(cfg, ctx)
    recipe.setup(train_examples, eval_examples)
    if not recipe.train():
        return recipe.stopped()
    return recipe.save()


class _Window:
    """Loss, gradient norm and tokens over the steps since the last progress report, kept on the device."""

    def __init__(self, device: str) -> None:
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.tokens = 0
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int) -> None:
        self.loss += loss
        self.grad_norm = grad_norm
        self.tokens += tokens
        self.steps += 1

    def reduce(self, dist: Dist) -> tuple[float, float, float]:
        """(mean loss per step over all processes, last grad norm, tokens of all processes)."""
        tokens = torch.tensor(float(self.tokens), device=self.loss.device)
        loss, tokens = dist.sum_(torch.stack([self.loss.float(), tokens])).tolist()
        return loss / max(self.steps, 1), float(self.grad_norm), tokens


def _full_state_dict(module) -> dict[str, torch.Tensor]:
    """FSDP: the sharded parameters gathered into full CPU tensors (a collective), named as the model names them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state: dict[str, Any] = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return {k.removeprefix("model."): v for k, v in state.items()}


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
        write_canonical_adapter_config(out / "adapter_config.json", cfg.base_model)
        return "lora_adapter", None
    if cfg.method == "full":
        model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
        return "model", None
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    save_file(
        {n: params[n].detach().float().contiguous().cpu() for n in sorted(trainable_names)},
        str(out / "delta.safetensors"),
    )
    (out / "delta_config.json").write_text(
        json.dumps(
            {
                "format": "tunedock-delta-v1",
                "base_model": cfg.base_model,
                "base_fingerprint": base_fingerprint(cfg.base_model),
                "tensors": sorted(trainable_names),
            },
            indent=2,
            sort_keys=True,
        )
    )
    expanded = None
    if cfg.publish_expanded:
        expanded = out.parent / (out.name + "-expanded")
        if expanded.exists():
            shutil.rmtree(expanded)
        expand_delta(out, cfg.base_model, expanded)
    return "delta", expanded


def write_canonical_adapter_config(path: Path, base_model: str) -> None:
    """Same adapter, same bytes: sorted keys and module lists (peft writes sets in hash order).

    QLoRA trains on a 4-bit view of the base but serves on the full-precision base it came from,
    which `base_model_name_or_path` names.
    """
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_model
    for key in ("target_modules", "modules_to_save", "exclude_modules", "layers_to_transform"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
