"""Checkpoints a killed run resumes from: weights that train, optimizer, schedule, every RNG.

One directory per step (`step-00000012/`), complete only once its `COMPLETE` marker exists, so a
worker killed mid-save resumes from the previous one; the two newest are kept. Without FSDP,
rank 0 writes the trainable tensors and the optimizer state; under FSDP every rank writes its
shards through torch.distributed.checkpoint. Every rank writes its own RNG states (CPU, every
CUDA device, Python's), so dropout and sampling continue exactly where they stopped.
"""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path

import torch

from services.common.disk import FULL, full_disk
from services.trainer.worker.training.distributed import Dist

MARKER = "COMPLETE"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, step: int, module, optimizer, extra: dict, dist: Dist, sharded: bool) -> Path:
    """Write a checkpoint of every rank (a collective: all ranks call it); returns its directory."""
    target = directory / f"step-{step:08d}"
    if dist.is_primary:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    dist.barrier()
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(module, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(target / "shards"))
    elif dist.is_primary:
        trainable = {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
        state = {"trainable": trainable, "optimizer": optimizer.state_dict()}
        try:
            torch.save(state, target / "weights.pt")
        except (OSError, RuntimeError) as exc:
            # torch's zip writer reports a full disk as "unexpected pos ... vs ...": say what happened.
            raise _full_disk_or(exc, step, target, _nbytes(state)) from exc
    torch.save(_rng_state(), target / f"rng-{dist.rank}.pt")
    dist.barrier()
    if dist.is_primary:
        torch.save({"step": step, **extra}, target / "state.pt")
        (target / MARKER).touch()
        for old in complete(directory)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return target


def complete(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(p for p in directory.glob("step-*") if (p / MARKER).exists())


def resume(directory: Path, module, optimizer, dist: Dist, sharded: bool) -> tuple[int, dict] | None:
    """Load the newest complete checkpoint into module and optimizer; (step, extra state) or None."""
    found = complete(directory)
    if not found:
        return None
    target = found[-1]
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(module, optimizer)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(target / "shards"))  # in place
        set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    else:
        saved = torch.load(target / "weights.pt", map_location="cpu", weights_only=False)
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, tensor in saved["trainable"].items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(saved["optimizer"])
    rng = target / f"rng-{dist.rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    extra = torch.load(target / "state.pt", weights_only=False)
    return int(extra.pop("step")), extra


def _nbytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_nbytes(v) for v in state)
    return 0


def _full_disk_or(exc: Exception, step: int, target: Path, needed: int) -> Exception:
    """A clear error when the checkpoint did not fit (the partial one is removed), else `exc` itself."""
    if getattr(exc, "errno", None) not in FULL and shutil.disk_usage(target.parent).free >= needed:
        return exc
    message = full_disk(f"the step-{step} checkpoint", target.parent, needed).message  # the free space before cleanup
    shutil.rmtree(target, ignore_errors=True)
    return OSError(errno.ENOSPC, message)
