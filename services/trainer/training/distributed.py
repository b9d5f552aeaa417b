"""Several training processes (torchrun): who am I, and the few collectives the recipe needs.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is one process and
every helper here is the identity. The recipe stays one flow: each rank builds the same
global batches, keeps its slice of rows, and normalises its loss by the token count of
the whole global step, so N processes with batch b compute the same update as one
process with batch N*b (DDP sums the gradients; see `loss_scale`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_primary(self) -> bool:
        """Rank 0 alone reports, checkpoints and publishes."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    def device(self) -> str:
        """cuda:<local rank> when there is a GPU (one process per GPU), else cpu."""
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}" if self.enabled else "cuda"
        return "cpu"

    def init(self, device: str) -> None:
        """Join the process group: NCCL between GPUs, gloo on CPUs."""
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- collectives (identity with one process)

    def sum(self, value: float, device: str = "cpu") -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool, device: str = "cpu") -> bool:
        """True on every rank if it is true on any (stop requests reach rank 0 only)."""
        return self.sum(1.0 if flag else 0.0, device) > 0

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


def wrap(model: torch.nn.Module, ctx: Dist, device: str, full_sharded: bool) -> torch.nn.Module:
    """DDP across processes; FSDP (shard parameters, gradients, optimizer state) for Full on GPUs."""
    if not ctx.enabled:
        return model
    if full_sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.local_rank] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
