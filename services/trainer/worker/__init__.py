"""The trainer's worker side: one process per attempt of a job (`python -m services.trainer.worker`).

It asks the trainer for its assignment, trains (training/), merges or extracts (extraction.py),
reports events and heartbeats (attempt.py) and publishes the result to the registry. These
modules are the only importers of torch, transformers, peft and bitsandbytes on the trainer's
side (an import-linter contract in pyproject.toml): the trainer server never loads them.
"""
