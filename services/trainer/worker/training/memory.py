"""Tensor memory of a training step, counted exactly (the CPU has no allocator statistics).

On CUDA the allocator's peak (`torch.cuda.max_memory_allocated`) is the measure. On the CPU the
process RSS mostly shows the Python/torch runtime and the allocator's caching, so TuneDock also
counts what training itself holds: every parameter, gradient and optimizer-state tensor, plus
the tensors autograd saves for backward (via saved-tensor hooks, parameters and shared storages
counted once) at the largest micro-batch seen.
"""

from __future__ import annotations

import resource

import torch


def peak_memory_bytes(device: str) -> int:
    """The process's peak: the CUDA allocator's on a GPU, the RSS high-water mark on the CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TensorMemory:
    def __init__(self, model) -> None:
        self.model = model
        self.param_storages = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
        self.max_saved = 0
        self._seen: set[int] = set()
        self._saved = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in self.param_storages and ptr not in self._seen:
            self._seen.add(ptr)
            self._saved += tensor.untyped_storage().nbytes()
        return tensor

    def saving(self):
        """Context for one forward pass: counts what autograd keeps for backward."""
        self._seen, self._saved = set(), 0
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def end_forward(self) -> None:
        self.max_saved = max(self.max_saved, self._saved)
        self._seen = set()

    def static_bytes(self, optimizer) -> int:
        """Parameters, their gradients (as fp32 trainable copies) and the optimizer state.

        Under FSDP these are DTensors: this process holds (and counts) only its shard.
        """
        seen: set[int] = set()
        total = 0
        for p in map(_local, self.model.parameters()):
            ptr = p.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += p.untyped_storage().nbytes()
            if p.requires_grad:
                total += p.numel() * p.element_size()  # its gradient
        for state in optimizer.state.values():
            tensors = [_local(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def peak_bytes(self, optimizer) -> int:
        return self.static_bytes(optimizer) + self.max_saved


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
