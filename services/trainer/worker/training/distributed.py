"""Several training processes (torchrun): who am I, and the few collectives the recipe needs.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is one process and every
helper here is the identity. Under torchrun the process group is used even with one process,
so a single GPU exercises the same NCCL path as eight. The recipe stays one flow: each rank
builds the same global batches, keeps its slice of rows, and normalises its loss by the token
count of the whole global step, so N processes with batch b compute the same update as one
process with batch N*b (DDP sums the gradients; see `loss_scale`).

Collectives run on the process group's device: NCCL only reduces CUDA tensors (a CPU tensor
fails with "No backend type associated with device type cpu"), so every tensor a collective
gets lives on `device`, the device this process trains on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    """Started by torchrun (a process group exists, even for one process)."""
    device: str = "cpu"
    """Where this process trains, and where collectives' tensors live."""

    @property
    def is_primary(self) -> bool:
        """Rank 0 alone reports, checkpoints and publishes."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.launched

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"

    @classmethod
    def from_env(cls) -> Dist:
        launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = "cpu"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=local_rank,
            launched=launched,
            device=device,
        )

    def on(self, device: str) -> Dist:
        return replace(self, device=device)

    def init(self) -> None:
        """Join the process group: NCCL between GPUs, gloo on CPUs."""
        if self.enabled and not dist.is_initialized():
            device_id = torch.device(self.device) if self.device.startswith("cuda") else None
            dist.init_process_group(self.backend, timeout=timedelta(minutes=30), device_id=device_id)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- collectives (identity with no process group)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; the tensor must live on `device`."""
        if self.enabled:
            if tensor.device != torch.device(self.device):
                raise ValueError(f"collective on {tensor.device}, but this process group reduces on {self.device}")
            dist.all_reduce(tensor)
        return tensor

    def sum(self, *values: float) -> list[float]:
        """Sums over all processes of a few numbers, in one collective."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.sum_(tensor).tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (stop requests reach rank 0 only)."""
        return self.sum(1.0 if flag else 0.0)[0] > 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def rows(self, n_rows: int) -> slice:
        """This rank's contiguous share of a global batch's rows (sizes differ by at most one)."""
        base, extra = divmod(n_rows, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    @property
    def loss_scale(self) -> float:
        """DDP averages gradients over ranks; scaling each rank's loss by the world size turns that into a sum."""
        return float(self.world_size)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
