"""Where a causal LM's parts are, under any wrapper (peft, DDP, FSDP, a multimodal model)."""

from __future__ import annotations

from typing import Any


def _inner(model):
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def decoder_of(model) -> Any:
    """The decoder: embeddings, layers, final norm (a multimodal model's language model)."""
    return _inner(model).get_decoder()


def head_of(model) -> Any:
    """The output layer (lm_head)."""
    return _inner(model).get_output_embeddings()
