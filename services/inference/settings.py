"""Inference settings."""

from __future__ import annotations

from typing import Any, ClassVar

from services.common.lora_shapes import DEFAULT_MAX_LORA_RANK, SERVABLE_RANKS
from services.common.settings import ServerSettings, setting
from tunedock.errors import InvalidArgument

_DTYPES = ("auto", "float32", "bfloat16", "float16")


class InferenceSettings(ServerSettings):
    """Settings of `python -m services.inference`."""

    ENV_PREFIX: ClassVar[str] = "TUNEDOCK_INFERENCE_"
    SERVICE_NAME: ClassVar[str] = "inference"
    DEFAULT_PORT: ClassVar[int] = 50053

    base_model: str = setting("", "base model (hub id or local path); empty means the embedded tiny model")
    registry_address: str = setting("127.0.0.1:50052", "address of the adapter registry adapters resolve through")
    registry_token_file: str = setting(
        "", "file with this service's token for the registry (needs registry.read on all projects)"
    )
    max_loras: int = setting(4, "adapters active in one engine batch (vLLM max_loras)")
    max_cpu_loras: int = setting(16, "adapters kept in the engine's host-memory LRU (vLLM max_cpu_loras)")
    max_lora_rank: int = setting(DEFAULT_MAX_LORA_RANK, "largest adapter rank served")
    max_model_len: int = setting(1024, "longest prompt + completion in tokens")
    dtype: str = setting(
        "auto",
        "engine dtype: auto (the checkpoint's own, so outputs match the trained model), float32, bfloat16, float16",
    )
    kv_cache_gib: float = setting(1.0, "KV cache size on the CPU backend, GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = setting(
        0.9,
        "share of the GPU's memory the engine takes for weights and KV cache (vLLM's gpu_memory_utilization); "
        "lower it when training workers share the GPU (tunedock plan --engine-share)",
    )
    adapter_cache_mb: int = setting(2048, "bound of the local adapter cache on disk, MiB")
    isolation: str = setting(
        "auto",
        "how a request's output stays independent of its batch-mates: auto (the engine's own LoRA kernels on GPUs, "
        "TuneDock's fix of vLLM's CPU ops, else a zero adapter for base requests), null-adapter, or off",
    )
    warm_on_promote: bool = setting(
        True, "load an adapter's new version when its alias moves, if this replica served the name recently"
    )
    warm_window_s: float = setting(86400.0, "how recently a name must have been served here to be warmed on promote")
    admission_max_wait_s: float = setting(
        2.0, "longest a request waits for its adapter's turn before other adapters drain for it"
    )
    resolve_ttl_s: float = setting(
        10.0, "seconds an adapter reference's resolution is cached (a registry Watch invalidates moved aliases sooner)"
    )
    tool_parser: str = setting(
        "auto",
        "vLLM tool-call parser for tool_choice auto (hermes, llama3_json, mistral, phi4_mini_json, pythonic, ...): "
        "auto picks it from the base's chat template and family; none parses no tool calls",
    )
    json_whitespace: str = setting(
        "any",
        "structured output (response_format json): any whitespace between JSON tokens, as models learn JSON, or "
        "compact (none: a small or unsure model cannot pad a reply with whitespace until max_tokens)",
    )
    served_model_name: str = setting(
        "",
        "the base's id in the OpenAI API (`model`, /v1/models); empty: the hub id, or a local path's directory name",
    )
    http_port: int = setting(
        -1, "port of the OpenAI-compatible HTTP API (/v1/chat/completions, ...); 0 picks a free one, -1 serves none"
    )
    fine_tuning_url: str = setting(
        "",
        "the trainer's OpenAI fine-tuning API (http://host:port, its --http-port): /v1/files and /v1/fine_tuning are "
        "forwarded there from this HTTP port, so clients see one base URL (tunedock up sets it); empty: those "
        "paths answer 404 saying where they live (behind a proxy, route them to the trainer by path)",
    )
    peers_srv: str = setting(
        "",
        "DNS SRV name of every replica's HTTP port (the headless Service's _http._tcp name the proxy reads): the "
        "console's Serving page shows each replica; empty: only the replica that answers",
    )
    peers_nameserver: str = setting("", "host:port of the DNS server for peers_srv; empty: the system's resolver")
    metrics_adapter_labels: str = setting(
        "hashed",
        "how metrics name adapters (tunedock_adapter_requests): hashed (a stable digest, no tenant's names on a "
        "shared monitoring stack), names, or off",
    )
    metrics_adapter_series: int = setting(
        32,
        "adapters with a series of their own in tunedock_adapter_requests (the first seen); the rest count as "
        "other, so thousands of adapters keep the series bounded (0: none)",
    )
    max_tokens_limit: int = setting(4096, "largest max_tokens a request may ask for")
    max_prompt_chars: int = setting(200_000, "longest prompt (or rendered chat) a request may send, in characters")

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.metrics_adapter_labels not in ("hashed", "names", "off"):
            raise InvalidArgument(
                f"metrics_adapter_labels must be hashed, names or off, got {self.metrics_adapter_labels!r}"
            )
        if self.isolation not in ("auto", "null-adapter", "off"):
            raise InvalidArgument(f"isolation must be auto, null-adapter or off, got {self.isolation!r}")
        if self.admission_max_wait_s <= 0:
            raise InvalidArgument(f"admission_max_wait_s must be > 0, got {self.admission_max_wait_s}")
        if self.dtype not in _DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.max_loras <= self.max_cpu_loras:
            raise InvalidArgument(
                "need 1 <= max_loras <= max_cpu_loras, "
                f"got max_loras={self.max_loras}, max_cpu_loras={self.max_cpu_loras}"
            )
        if self.max_lora_rank not in SERVABLE_RANKS:
            raise InvalidArgument(
                f"max_lora_rank must be one of {', '.join(map(str, SERVABLE_RANKS))} (vLLM), got {self.max_lora_rank}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidArgument(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.json_whitespace not in ("any", "compact"):
            raise InvalidArgument(f"json_whitespace must be any or compact, got {self.json_whitespace!r}")
        if not -1 <= self.http_port <= 65535:
            raise InvalidArgument(f"http_port must be -1..65535, got {self.http_port}")
        if self.kv_cache_gib <= 0 or self.max_model_len <= 0 or self.adapter_cache_mb <= 0:
            raise InvalidArgument("kv_cache_gib, max_model_len and adapter_cache_mb must be > 0")
