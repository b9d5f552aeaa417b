"""TuneDock's vLLM plugin: batch isolation for LoRA on the CPU, and engines that never outlive the service.

vLLM loads `vllm.general_plugins` entry points in every process it runs (the API process, the
engine core, each worker), so both fixes reach where they are needed:

1. Isolation. vLLM's CPU LoRA path (`vllm/lora/ops/torch_ops/lora_ops.py`) gathers the stacked
   adapter weights with `weights[lora_indices]`; a token without an adapter carries index -1,
   which Python maps to the *last* slot. Harmless while that slot is empty; once every slot is
   taken, base requests get another caller's adapter. The patched ops give rows with a negative
   index no LoRA update at all. They are installed only where the installed ops show the bug
   (checked on synthetic tensors, so a vLLM that fixed it is left alone); GPU kernels skip such
   rows themselves and are never touched.
2. Lifetime. A process that vLLM started for the service (engine core, worker) exits when its
   parent does, even after `kill -9` of the service (a daemon thread watches the parent pid),
   instead of holding gigabytes, reparented to init.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time

log = logging.getLogger(__name__)

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
_state = {"patched": False, "watching": False}


def register() -> None:
    """The entry point vLLM calls (possibly several times per process)."""
    if os.environ.get("TUNEDOCK_VLLM_PLUGIN", "1") == "0":
        return
    _watch_parent()
    if os.environ.get("TUNEDOCK_ISOLATION_FIX", "1") == "0":
        return  # the service chose isolation "off": vLLM's own ops, as they are
    try:
        install_isolation_fix()
    except Exception as exc:  # never take the engine down: the service falls back and says why
        log.warning("TuneDock isolation fix not installed: %s", exc)


# ------------------------------------------------------------------------------------ lifetime


def _watch_parent() -> None:
    if _state["watching"] or multiprocessing.parent_process() is None:
        return  # the service's own process: nothing to watch
    _state["watching"] = True
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:  # reparented: the process that started us is gone
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tunedock-parent-watch").start()


# ----------------------------------------------------------------------------------- isolation


def _masked(values, indices):
    """`values` with the rows whose LoRA index is negative (no adapter) zeroed."""
    return values * (indices >= 0).unsqueeze(1).to(values.dtype)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    import torch

    selected = lora_a_weights[lora_indices_tensor.clamp(min=0)].to(dtype=output_tensor.dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    output_tensor[:, : outputs.shape[1]] = scaling * _masked(outputs, lora_indices_tensor)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    import torch

    selected = lora_b_weights[lora_indices_tensor.clamp(min=0)].to(dtype=output_tensor.dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    outputs = _masked(
        torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected), lora_indices_tensor
    )
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs=True
):
    import torch

    selected = lora_b_weights[lora_indices_tensor.clamp(min=0)].to(dtype=output_tensor.dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    outputs = _masked(
        torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected), lora_indices_tensor
    )
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):  # fmt: skip
    import torch

    exploded = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, exploded, scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):  # fmt: skip
    import torch

    exploded = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, exploded, add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):  # fmt: skip
    import torch

    exploded = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, exploded, slice_offset, slice_size, add_inputs)


def leaks_into_base_rows(ops) -> bool:
    """Whether `ops` (a module with vLLM's CPU LoRA ops) gives a row with index -1 a LoRA update.

    Synthetic tensors: two slots, both non-zero; row 0 uses slot 0, row 1 has no adapter (-1).
    Row 1 must come out of shrink, expand and expand-slice exactly as it went in.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=generator)
    a = torch.randn(2, 1, 4, 8, generator=generator)  # [slots, 1, rank, in]
    b = torch.randn(2, 1, 6, 4, generator=generator)  # [slots, 1, out, rank]
    indices = torch.tensor([0, -1])
    shrunk = torch.zeros(2, 4)
    ops.bgmv_shrink(x, a, shrunk, indices, 1.0)
    expanded = torch.ones(2, 6)
    ops.bgmv_expand(torch.randn(2, 4, generator=generator), b, expanded, indices, True)
    sliced = torch.ones(2, 10)
    ops.bgmv_expand_slice(torch.randn(2, 4, generator=generator), b, sliced, indices, 2, 6, True)
    return bool(
        shrunk[1].abs().sum() > 0
        or not torch.equal(expanded[1], torch.ones(6))
        or not torch.equal(sliced[1], torch.ones(10))
    )


def install_isolation_fix() -> bool:
    """Patch vLLM's CPU LoRA ops where they leak; returns whether the installed ops are safe now."""
    import importlib

    modules = []
    names = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
    for name in names:
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(name))
    if not modules:
        return True  # no CPU LoRA path in this vLLM
    ops = modules[0]
    if not _state["patched"] and not leaks_into_base_rows(ops):
        return True  # this vLLM's ops are already right
    fixed = globals()
    for module in modules:
        for name in OPS:
            if hasattr(module, name):
                setattr(module, name, fixed[name])
    _state["patched"] = True
    return not leaks_into_base_rows(ops)


def isolation_status() -> tuple[str, str]:
    """(mode, why) for this process's vLLM: "native" (no CPU path or already right), "patched-ops", or "broken"."""
    import importlib

    try:
        ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    except ImportError:
        return "native", "this vLLM has no torch-ops LoRA path"
    if not leaks_into_base_rows(ops):
        if _state["patched"]:
            return "patched-ops", "vLLM's CPU LoRA ops gave base rows the last slot's adapter; TuneDock patched them"
        return "native", "vLLM's LoRA ops give rows without an adapter no update"
    return "broken", "vLLM's CPU LoRA ops give rows without an adapter the last slot's update (fix not installed)"
