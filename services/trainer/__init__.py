"""Trainer: runs Full, Freeze, LoRA and QLoRA jobs and publishes their outputs."""
