"""The vLLM engine wrapper: one AsyncLLM over one base model, LoRA enabled.

Isolation: a request's greedy output must not depend on which other requests share its batch.
`isolation` chooses how that holds:
- "auto" (default): on GPUs vLLM's LoRA kernels give rows without an adapter no update
  ("native"); on the CPU, TuneDock's vLLM plugin patches the torch ops that leaked the last
  slot's adapter into base rows ("patched-ops", see vllm_plugin.py). The fix is proved on
  synthetic tensors here before the engine starts; if it cannot be installed or does not hold,
  base requests run through an all-zero "null" adapter instead ("null-adapter", which costs
  base traffic a LoRA pass and one of the `max_loras` slots) and the log says why.
- "null-adapter": always the zero adapter. "off": nothing (only for measuring what isolation costs).

Dtype: "auto" serves in the checkpoint's own dtype (vLLM's "auto" would serve a float32
checkpoint in bfloat16, whose outputs then drift from the trained model's).

A dead engine is visible: `dead` turns true, requests fail UNAVAILABLE with a clear message,
and the server's supervisor restarts it (server.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from services.common.basemodels import resolve_local_base
from services.common.chat import ChatRenderer
from services.common.lora_shapes import SERVABLE_MODULES
from services.inference.tools import choose_parser
from tunedock.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

NULL_ADAPTER_ID = 2**31 - 1
ISOLATION_MODES = ("auto", "null-adapter", "off")


@dataclass(frozen=True)
class EngineOptions:
    """What the engine is built from (InferenceSettings' engine part, flat)."""

    base_model: str
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_model_len: int
    dtype: str
    """auto (the checkpoint's dtype), float32, bfloat16 or float16."""
    kv_cache_gib: float
    work_dir: Path
    isolation: str = "auto"
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    tool_parser: str = "auto"
    """vLLM's tool-call parser for `tool_choice` auto: a name, "auto" (by the base's template and family), "none"."""
    json_whitespace: str = "any"
    """Structured output: "any" whitespace between JSON tokens (as the model learned JSON), or "compact"."""


def checkpoint_dtype(base_model: str) -> str:
    """The dtype the checkpoint's config.json names, in vLLM's spelling ("auto" if it names none)."""
    local = resolve_local_base(base_model)
    if local is None:
        return "auto"
    config = json.loads((local / "config.json").read_text())
    named = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return named if named in ("float32", "bfloat16", "float16") else "auto"


def model_type(base_model: str) -> str:
    """config.json's model_type of a local base ("" where there is none to read)."""
    local = resolve_local_base(base_model)
    try:
        return str(json.loads((local / "config.json").read_text()).get("model_type", "")) if local else ""
    except (OSError, ValueError):
        return ""


def plugin_installed() -> bool:
    """TuneDock's vLLM plugin is registered (so vLLM's engine processes load it) and not switched off."""
    from importlib.metadata import entry_points

    allowed = os.environ.get("VLLM_PLUGINS")
    names = {e.name for e in entry_points(group="vllm.general_plugins") if e.value.startswith("services.inference")}
    return (
        bool(names)
        and (allowed is None or bool(names & set(allowed.split(","))))
        and (os.environ.get("TUNEDOCK_VLLM_PLUGIN", "1") != "0")
    )


def choose_isolation(requested: str) -> tuple[str, str]:
    """(mode, why): native, patched-ops, null-adapter or off."""
    if requested == "off":
        return "off", "isolation is off by setting: base requests may pick up another request's adapter on the CPU"
    if requested == "null-adapter":
        return "null-adapter", "base requests run through an all-zero adapter (by setting)"
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "native", "vLLM's GPU LoRA kernels give rows without an adapter no update"
    from services.inference import vllm_plugin

    if not plugin_installed():
        return (
            "null-adapter",
            "TuneDock's vLLM plugin is not installed (pip install the package): using the zero adapter",
        )
    vllm_plugin.install_isolation_fix()
    mode, why = vllm_plugin.isolation_status()
    if mode == "broken":
        return "null-adapter", f"{why}: using the zero adapter instead"
    return mode, why


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
            target_modules=sorted(SERVABLE_MODULES),  # those the base has
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
    """AsyncLLM plus the bits the core needs: prompts from chat messages, LoRA requests, abort, health."""

    def __init__(self, options: EngineOptions) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(options.kv_cache_gib))))
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        self.options = options
        self.base_model = options.base_model
        self.isolation, self.isolation_why = choose_isolation(options.isolation)
        self.dtype = checkpoint_dtype(options.base_model) if options.dtype == "auto" else options.dtype
        log.info("isolation: %s (%s); dtype %s", self.isolation, self.isolation_why, self.dtype)
        # vLLM types max_lora_rank and dtype as Literals; InferenceSettings checks both values.
        args = AsyncEngineArgs(
            model=options.base_model,
            enable_lora=True,
            max_loras=options.max_loras,
            max_cpu_loras=options.max_cpu_loras,
            max_lora_rank=options.max_lora_rank,  # type: ignore[arg-type]
            max_model_len=options.max_model_len,
            dtype=self.dtype,  # type: ignore[arg-type]
            seed=options.seed,
            disable_log_stats=True,
            gpu_memory_utilization=options.gpu_memory_utilization,
            structured_outputs_config=StructuredOutputsConfig(
                disable_any_whitespace=options.json_whitespace == "compact"
            ),
        )
        # The engine's processes inherit the environment as they start: "off" keeps vLLM's own ops there.
        previous = os.environ.get("TUNEDOCK_ISOLATION_FIX")
        os.environ["TUNEDOCK_ISOLATION_FIX"] = "0" if self.isolation == "off" else "1"
        try:
            self.llm = AsyncLLM.from_engine_args(args)
        finally:
            if previous is None:
                os.environ.pop("TUNEDOCK_ISOLATION_FIX", None)
            else:
                os.environ["TUNEDOCK_ISOLATION_FIX"] = previous
        self.tokenizer = self.llm.get_tokenizer()
        self.chat = ChatRenderer(self.tokenizer, lambda message: log.info("chat: %s", message))
        """Renders chat prompts exactly as the trainer renders training conversations."""
        self.tool_parser = choose_parser(
            options.tool_parser, self.chat.template, model_type(options.base_model), self.tokenizer
        )
        log.info("tool-call parser: %s", self.tool_parser or "none")
        self.null_adapter = None
        if self.isolation == "null-adapter":
            from vllm.lora.request import LoRARequest

            path = write_null_adapter(options.base_model, Path(options.work_dir) / "null-adapter")
            self.null_adapter = LoRARequest("__base__", NULL_ADAPTER_ID, str(path))

    @property
    def base_takes_a_slot(self) -> bool:
        """Base requests run through the zero adapter, which occupies one of the engine's LoRA slots."""
        return self.null_adapter is not None

    @property
    def dead(self) -> bool:
        return bool(self.llm.errored)

    def prompt_from_messages(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self.chat.prompt(messages, tools)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.encode(prompt))

    def encode(self, prompt: str) -> list[int]:
        """A raw prompt's token ids as the engine makes them (the tokenizer's own special tokens added)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def lora_request(self, name: str, lora_id: int, path: str):
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, lora_id, path)

    async def generate(
        self, prompt: str | list[int], sampling: dict, request_id: str, lora_request=None, stream: bool = True
    ) -> AsyncIterator:
        """Outputs as they come: deltas when streaming, the final output alone otherwise (fewer wake-ups).

        `prompt` is raw text (the tokenizer's own special tokens added) or token ids (a rendered chat).
        `sampling` holds SamplingParams' fields, plus `json_schema` (a dict) or `json_object` (True)
        for structured output."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.dead:
            raise Unavailable(DEAD)
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        sampling = dict(sampling)
        schema, json_object = sampling.pop("json_schema", None), sampling.pop("json_object", None)
        if schema is not None:
            sampling["structured_outputs"] = StructuredOutputsParams(json=schema)
        elif json_object:
            sampling["structured_outputs"] = StructuredOutputsParams(json_object=True)
        engine_prompt = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
        try:
            params = SamplingParams(output_kind=kind, **sampling)
            async for output in self.llm.generate(
                engine_prompt,  # type: ignore[arg-type]
                params,
                request_id,
                lora_request=lora_request or self.null_adapter,
            ):
                yield output
        except EngineDeadError:
            raise Unavailable(DEAD) from None
        except VLLMValidationError as exc:  # the caller's input (e.g. a prompt past max_model_len), not a fault
            raise InvalidArgument(str(exc)) from None

    async def abort(self, request_id: str) -> None:
        if not self.dead:
            await self.llm.abort(request_id)

    async def remove_lora(self, lora_id: int) -> bool:
        return await self.llm.remove_lora(lora_id)

    async def loaded_lora_ids(self) -> set[int]:
        return await self.llm.list_loras()

    def shutdown(self) -> None:
        self.llm.shutdown()


DEAD = "the inference engine stopped; this replica is restarting it (health NOT_SERVING until then): retry shortly"
