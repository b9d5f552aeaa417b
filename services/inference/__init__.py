"""Inference: one vLLM engine over a base model, LoRA adapters picked per request."""
