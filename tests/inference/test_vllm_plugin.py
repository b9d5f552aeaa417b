"""TuneDock's vLLM plugin on synthetic tensors (no engine): vLLM 0.32's CPU LoRA ops leak the last slot's adapter
into rows without one; the patched ops give those rows nothing and compute the same as vLLM's for the others."""

from __future__ import annotations

import importlib

import torch

from services.inference import vllm_plugin


def _original_ops():
    """vLLM's own ops module, fresh (the plugin may have patched the imported one in this process)."""
    import vllm.lora.ops.torch_ops.lora_ops as ops

    return importlib.reload(ops)


def test_vllms_cpu_ops_leak_and_the_patched_ones_do_not():
    original = _original_ops()
    assert vllm_plugin.leaks_into_base_rows(original)  # the upstream bug this plugin exists for
    assert not vllm_plugin.leaks_into_base_rows(vllm_plugin)


def test_the_patched_ops_equal_vllms_on_rows_with_an_adapter():
    original = _original_ops()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=generator)
    a = torch.randn(3, 1, 4, 16, generator=generator)
    b = torch.randn(3, 1, 12, 4, generator=generator)
    indices = torch.tensor([0, 2, 1, 2, 0])  # every row has an adapter: both must agree exactly
    for ops in (original, vllm_plugin):
        shrunk = torch.zeros(5, 4)
        ops.bgmv_shrink(x, a, shrunk, indices, 0.5)
        expanded = torch.ones(5, 12)
        ops.bgmv_expand(shrunk, b, expanded, indices, True)
        sliced = torch.zeros(5, 20)
        ops.bgmv_expand_slice(shrunk, b, sliced, indices, 4, 12, False)
        if ops is original:
            expected = (shrunk.clone(), expanded.clone(), sliced.clone())
        else:
            for got, want in zip((shrunk, expanded, sliced), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_install_patches_every_module_that_imported_the_ops():
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    assert vllm_plugin.install_isolation_fix()
    assert punica_cpu.bgmv_shrink is vllm_plugin.bgmv_shrink and punica_cpu.sgmv_expand is vllm_plugin.sgmv_expand
    mode, _ = vllm_plugin.isolation_status()
    assert mode == "patched-ops"
