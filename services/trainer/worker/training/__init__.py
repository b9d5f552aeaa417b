"""The training flow (worker side only: imports torch, transformers, peft, bitsandbytes)."""
