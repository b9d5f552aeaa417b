"""The trainer's disk fills during a dataset upload: RESOURCE_EXHAUSTED naming the upload and the free
space, nothing left in staging, and the next upload that fits succeeds without a restart."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from tests.trainer.conftest import memorization_jsonl
from tests.trainer.test_service import Stack


def test_an_upload_that_fills_the_disk_is_refused_and_cleaned_up(small_disk, tmp_path):
    big = tmp_path / "big.jsonl"
    line = json.dumps({"instruction": "x" * 1000, "output": "y"}) + "\n"
    big.write_text(line * (30 << 10))  # ~30 MiB into 20 MiB
    small = tmp_path / "small.jsonl"
    small.write_bytes(memorization_jsonl())
    stack = Stack(small_disk)
    try:
        free_before = shutil.disk_usage(small_disk).free
        with pytest.raises(grpc.RpcError) as info:
            stack.client.upload_dataset(big)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("no space left on the device writing the upload of big.jsonl")
        assert list((small_disk / "trainer" / "staging").iterdir()) == []
        assert shutil.disk_usage(small_disk).free >= free_before - (1 << 20)
        assert stack.client.upload_dataset(small).num_records == 8
    finally:
        stack.stop()


def test_a_checkpoint_that_does_not_fit_says_so(small_disk, tiny_model_dir, memorization_examples, tmp_path):
    """Full training's weights and Adam state into a disk with 256 KiB left: torch's own error
    ("unexpected pos ...") becomes one that names the step, the folder, the free and needed space."""
    from services.trainer.config import TrainConfig
    from services.trainer.worker.training.distributed import Dist
    from services.trainer.worker.training.recipe import RunContext, train

    cfg = TrainConfig(
        base_model=str(tiny_model_dir),
        method="full",
        dataset_ids=["ds"],
        max_steps=4,
        batch_size=4,
        checkpoint_every_steps=2,
        log_every_steps=2,
    )
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - (256 << 10)))
    ctx = RunContext(small_disk / "ckpt", tmp_path / "out", dist=Dist(device="cpu"))
    with pytest.raises(OSError) as info:
        train(cfg, memorization_examples, [], ctx)
    message = str(info.value)
    assert "no space left on the device writing the step-2 checkpoint to" in message and "needed ~" in message
    assert not (small_disk / "ckpt" / "step-00000002").exists()  # the partial checkpoint is gone
