"""What a training run reports, as typed records (the worker maps them to protos in one place)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_second: float
    peak_memory_bytes: int
    eta_s: float


@dataclass(frozen=True)
class Eval:
    step: int
    eval_loss: float


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str


@dataclass(frozen=True)
class Log:
    message: str


Event = Progress | Eval | Checkpoint | Log
