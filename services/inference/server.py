"""Wires the engine, adapter resolver/cache and servicer into a server."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from services.common.auth import method_roles
from services.common.basemodels import base_fingerprint
from services.common.server import GrpcServer, ServiceBinding
from services.inference.adapters import AdapterCache, AdapterResolver
from services.inference.core import InferenceCore, Limits
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from tunedock.client import RegistryClient
from tunedock.client.channel import read_token
from tunedock.v1 import inference_pb2, inference_pb2_grpc

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class InferenceMetrics:
    ttft: Histogram
    tokens: Counter
    in_flight: Gauge
    adapter_resolve: Histogram
    adapter_download: Histogram
    adapter_load: Histogram
    cache_events: Counter
    adapter_requests: Counter

    @classmethod
    def create(cls, registry) -> InferenceMetrics:
        return cls(
            Histogram("tunedock_inference_ttft_seconds", "Time to first token.", buckets=BUCKETS, registry=registry),
            Counter("tunedock_inference_output_tokens", "Generated tokens.", registry=registry),
            Gauge("tunedock_inference_requests_in_flight", "Generations in progress.", registry=registry),
            Histogram(
                "tunedock_adapter_resolve_seconds", "Adapter reference resolution.", buckets=BUCKETS, registry=registry
            ),
            Histogram(
                "tunedock_adapter_download_seconds",
                "Adapter download from the registry.",
                buckets=BUCKETS,
                registry=registry,
            ),
            Histogram(
                "tunedock_adapter_load_seconds",
                "First request on an adapter (engine load).",
                buckets=BUCKETS,
                registry=registry,
            ),
            Counter(
                "tunedock_adapter_cache",
                "Local adapter cache hits, misses and evictions.",
                ["event"],
                registry=registry,
            ),
            Counter("tunedock_adapter_requests", "Requests per adapter.", ["adapter"], registry=registry),
        )


ROLES = {
    "Generate": "inference.generate",
    "GenerateUnary": "inference.generate",
    "PreloadAdapter": "inference.admin",
    "UnloadAdapter": "inference.admin",
    "ListLoadedAdapters": "inference.admin",
}


def default_base_model(settings: InferenceSettings) -> str:
    if settings.base_model:
        return settings.base_model
    from tunedock.tiny_model import build_tiny_model

    return str(build_tiny_model(cache_dir=settings.data_dir / "models"))


async def build_server(settings: InferenceSettings, engine=None) -> GrpcServer:
    """`engine` lets tests share one engine across servers; normally it is built here."""
    base_model = await asyncio.to_thread(default_base_model, settings)
    work = settings.data_dir / "inference"
    owns_engine = engine is None
    if engine is None:
        from services.inference.engine import Engine

        engine = await asyncio.to_thread(
            Engine,
            base_model,
            settings.max_loras,
            settings.max_cpu_loras,
            settings.max_lora_rank,
            settings.max_model_len,
            settings.dtype,
            settings.kv_cache_gib,
            work,
            settings.isolate_base,
            gpu_memory_utilization=settings.gpu_memory_utilization,
        )
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    server = GrpcServer(settings, [], roles=method_roles(service, ROLES))
    metrics = InferenceMetrics.create(server.metrics.registry)
    registry = RegistryClient(settings.registry_address, timeout=30, token=read_token(settings.registry_token_file))
    resolver = AdapterResolver(registry, ttl_s=settings.resolve_ttl_s)
    cache = AdapterCache(
        work / "adapters",
        registry,
        settings.adapter_cache_mb * 1024 * 1024,
        settings.max_lora_rank,
        await asyncio.to_thread(base_fingerprint, base_model),
        base_model,
        metrics,
    )
    limits = Limits(max_tokens=settings.max_tokens_limit, max_prompt_chars=settings.max_prompt_chars)
    core = InferenceCore(engine, resolver, cache, metrics, limits)
    server.bindings = [
        ServiceBinding(
            service.full_name, InferenceServicer(core), inference_pb2_grpc.add_InferenceServiceServicer_to_server
        )
    ]
    stop = threading.Event()
    threading.Thread(target=resolver.follow, args=(stop,), daemon=True, name="registry-watch").start()
    server.on_stop.append(stop.set)
    server.on_stop.append(registry.close)
    if owns_engine:
        server.on_stop.append(engine.shutdown)
    server.core = core
    return server
