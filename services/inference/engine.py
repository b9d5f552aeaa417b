"""The vLLM engine wrapper: one AsyncLLM over one base model, LoRA enabled.

Isolation: vLLM's CPU LoRA path has been seen to give base-model requests different
output when they share a batch with adapter requests. With `isolate_base=True` (the
default) base requests run through an all-zero "null" adapter, so every batch is
uniformly a LoRA batch; a zero update leaves the base output unchanged (tested).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

NULL_ADAPTER_ID = 2**31 - 1


def write_null_adapter(base_model: str, directory: Path, rank: int = 8) -> Path:
    """A LoRA adapter whose B matrices are zero on every servable module of the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if (directory / "adapter_model.safetensors").exists():
        return directory
    config = AutoConfig.from_pretrained(base_model)
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    state = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default.weight", ".weight")
            state[key] = torch.zeros(param.shape, dtype=torch.float32)
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(directory))
    adapter_config = json.loads((directory / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base_model
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    return directory


class Engine:
    """AsyncLLM plus the bits the servicer needs: prompts from chat messages, LoRA requests, abort."""

    def __init__(
        self,
        base_model: str,
        max_loras: int,
        max_cpu_loras: int,
        max_lora_rank: int,
        max_model_len: int,
        dtype: str,
        kv_cache_gib: float,
        work_dir: Path,
        isolate_base: bool = True,
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.base_model = base_model
        args = AsyncEngineArgs(
            model=base_model,
            enable_lora=True,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            max_lora_rank=max_lora_rank,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            disable_log_stats=True,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.llm.get_tokenizer()
        self.null_adapter = None
        if isolate_base:
            from vllm.lora.request import LoRARequest

            path = write_null_adapter(base_model, Path(work_dir) / "null-adapter")
            self.null_adapter = LoRARequest("__base__", NULL_ADAPTER_ID, str(path))

    def prompt_from_messages(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    def lora_request(self, name: str, lora_id: int, path: str):
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, lora_id, path)

    async def generate(self, prompt: str, sampling: dict, request_id: str, lora_request=None) -> AsyncIterator:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(output_kind=RequestOutputKind.DELTA, **sampling)
        async for output in self.llm.generate(
            prompt, params, request_id, lora_request=lora_request or self.null_adapter
        ):
            yield output

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def remove_lora(self, lora_id: int) -> bool:
        return await self.llm.remove_lora(lora_id)

    async def loaded_lora_ids(self) -> set[int]:
        return await self.llm.list_loras()

    def shutdown(self) -> None:
        self.llm.shutdown()
