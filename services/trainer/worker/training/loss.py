"""The causal LM loss from hidden states, without the full-vocabulary logits in memory.

`logits = h @ W.T` over the whole micro-batch in fp32 is tokens x vocab x 4 bytes: 8 GiB for 16k
tokens of Llama-3's 128k vocabulary, held again for backward. Only the positions the loss covers
need logits at all (prompts and padding do not), and those are computed a chunk at a time under
activation checkpointing, so a step holds one chunk's logits whatever the sequence length. The
result equals the plain `CrossEntropyLoss` over full logits (tested), including Gemma's final
logit soft-capping. On CUDA with liger-kernel installed, its fused linear cross-entropy does the
same in one kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from services.trainer.worker.training.anatomy import decoder_of, head_of
from services.trainer.worker.training.formatting import IGNORE

CHUNK_ELEMENTS = 2**26  # logits per chunk (fp32: 256 MiB), whatever the vocabulary


def _chunk_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, softcap: float
) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def summed_loss(
    hidden: torch.Tensor,
    head: Any,
    labels: torch.Tensor,
    softcap: float = 0.0,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Sum over every covered position of -log p(label), from the decoder's last hidden states.

    `hidden` is [batch, seq, d] and `labels` [batch, seq] (label t is predicted at position t - 1,
    IGNORE marks positions without loss); `head` is the model's output layer (lm_head).
    """
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph (every process must run backward)
    weight: torch.Tensor = head.weight
    bias: torch.Tensor | None = getattr(head, "bias", None)
    fused = _liger_loss(states, weight, bias, targets, softcap)
    if fused is not None:
        return fused
    step = chunk_tokens or max(256, CHUNK_ELEMENTS // weight.shape[0])
    if targets.numel() <= step:
        return _chunk_loss(states, weight, bias, targets, softcap)
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), step):
        part = slice(start, start + step)
        total = total + checkpoint(_chunk_loss, states[part], weight, bias, targets[part], softcap, use_reentrant=False)
    return total


def _liger_loss(states, weight, bias, targets, softcap: float) -> torch.Tensor | None:
    """liger-kernel's fused linear cross-entropy on CUDA, if installed; None otherwise."""
    if not states.is_cuda:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy(
        states, weight, targets, bias=bias, reduction="sum", softcap=softcap or None
    ).float()


class CausalLMLoss(torch.nn.Module):
    """A causal LM and its loss as one module: what DDP and FSDP wrap, and what the recipe calls.

    forward(...) returns the summed loss over the covered tokens (divide by the step's token count).
    The decoder runs as the model's own (with LoRA layers, gradient checkpointing, packing by
    position ids); only the output layer is applied here, chunk by chunk.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.softcap = float(getattr(model.config.get_text_config(), "final_logit_softcapping", None) or 0.0)

    def forward(self, input_ids, position_ids, labels, attention_mask=None) -> torch.Tensor:
        hidden = decoder_of(self.model)(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return summed_loss(hidden, head_of(self.model), labels, self.softcap)
