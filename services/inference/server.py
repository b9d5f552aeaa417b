"""Wires the engine, adapter resolver/cache, admission and servicer into a server, and watches the engine."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from services.common.auth import method_roles
from services.common.basemodels import base_fingerprint, resolve_local_base
from services.common.http import HttpServer
from services.common.lora_shapes import base_module_shapes
from services.common.server import GrpcServer, ServiceBinding
from services.inference.adapters import AdapterCache, AdapterResolver
from services.inference.catalog import ModelCatalog
from services.inference.core import InferenceCore, Limits
from services.inference.openai_api import OpenAIFront, build_app
from services.inference.registry_api import RegistryFront
from services.inference.scheduler import AdapterScheduler
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from tunedock import __version__
from tunedock.client import RegistryClient
from tunedock.client.channel import read_token
from tunedock.client.inference import ROUTING_KEY
from tunedock.v1 import adapter_registry_pb2 as rpb
from tunedock.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)
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
    queued: Gauge
    active_adapters: Gauge
    admission_wait: Histogram
    isolation: Gauge
    engine_restarts: Counter
    adapters_warmed: Counter
    adapter_labels: str = "hashed"
    """What names an adapter in metric labels: names, hashed (a stable digest: tenants' adapter names
    stay out of a shared monitoring stack) or off (one series for all)."""
    adapter_series: int = 32
    """Adapters with a series of their own (the first seen); the rest share "other": bounded cardinality."""
    _labelled: set[str] = field(default_factory=set)

    def adapter_label(self, name: str) -> str:
        if self.adapter_labels == "off":
            return "any"
        if name not in self._labelled:
            if len(self._labelled) >= self.adapter_series:
                return "other"
            self._labelled.add(name)
        if self.adapter_labels == "names":
            return name
        return "h-" + hashlib.sha256(name.encode()).hexdigest()[:12]

    @classmethod
    def create(cls, registry, adapter_labels: str = "hashed", adapter_series: int = 32) -> InferenceMetrics:
        def histogram(name: str, text: str) -> Histogram:
            return Histogram(name, text, buckets=BUCKETS, registry=registry)

        Gauge(
            "tunedock_gc_frozen_objects",
            "Objects hidden from Python's cyclic collector once the engine started (freeze_heap).",
            registry=registry,
        ).set_function(gc.get_freeze_count)
        return cls(
            histogram("tunedock_inference_ttft_seconds", "Time to first token."),
            Counter("tunedock_inference_output_tokens", "Generated tokens.", registry=registry),
            Gauge("tunedock_inference_requests_in_flight", "Generations in progress.", registry=registry),
            histogram("tunedock_adapter_resolve_seconds", "Adapter reference resolution."),
            histogram("tunedock_adapter_download_seconds", "Adapter download from the registry."),
            histogram("tunedock_adapter_load_seconds", "First request on an adapter (engine load)."),
            Counter(
                "tunedock_adapter_cache",
                "Local adapter cache hits, misses and evictions.",
                ["event"],
                registry=registry,
            ),
            Counter("tunedock_adapter_requests", "Requests per adapter.", ["adapter"], registry=registry),
            Gauge(
                "tunedock_admission_queued_requests", "Requests waiting for their adapter's turn.", registry=registry
            ),
            Gauge("tunedock_admission_active_adapters", "Adapters the engine works on now.", registry=registry),
            histogram("tunedock_admission_wait_seconds", "Time a request waited for its adapter's turn."),
            Gauge(
                "tunedock_inference_isolation",
                "How batch isolation is kept (1 for the mode).",
                ["mode"],
                registry=registry,
            ),
            Counter("tunedock_inference_engine_restarts", "Engines rebuilt after dying.", registry=registry),
            Counter(
                "tunedock_adapter_warmed",
                "Adapters loaded ahead of their first request (promotions).",
                registry=registry,
            ),
            adapter_labels,
            adapter_series,
        )


ROLES: dict[str, str | None] = {
    "Generate": "inference.generate",
    "GenerateUnary": "inference.generate",
    "PreloadAdapter": "inference.admin",
    "UnloadAdapter": "inference.admin",
    "ListLoadedAdapters": "inference.admin",
    "GetInferenceInfo": None,  # any authenticated caller
}


def architecture_of(local: Path | None) -> str:
    """config.json's architectures[0] of a local base ("" when there is none to read)."""
    try:
        return json.loads((local / "config.json").read_text())["architectures"][0] if local else ""
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


def device_kind() -> str:
    import torch  # the engine already imported it

    return "cuda" if torch.cuda.is_available() else "cpu"


def served_model_name(settings: InferenceSettings, base_model: str) -> str:
    """The base's id in the OpenAI API: the setting, a hub id as is, a local path's directory name."""
    if settings.served_model_name:
        return settings.served_model_name
    configured = settings.base_model or base_model
    return Path(configured).name if Path(configured).exists() else configured


def default_base_model(settings: InferenceSettings) -> str:
    if settings.base_model:
        return settings.base_model
    from tunedock.tiny_model import build_tiny_model

    return str(build_tiny_model(cache_dir=settings.data_dir / "models"))


def freeze_heap() -> None:
    """Hide everything alive now (torch, vLLM, the engine's Python objects) from the cyclic collector.

    As vLLM's own server does after start-up: with ~700k such objects in this process, each
    full collection walks them all and holds the event loop for tens of milliseconds, which
    showed up as the largest item in py-spy profiles of serving. Objects made later (requests,
    replies) are collected as usual.
    """
    gc.collect()
    gc.freeze()


class EngineSupervisor:
    """Watches the engine. A dead one turns health NOT_SERVING at once (in-flight and new calls get
    UNAVAILABLE from the engine wrapper); the supervisor rebuilds it, at most `max_restarts` times per
    `window_s`, and otherwise stops the service with exit code 1 so that its supervisor restarts it."""

    def __init__(
        self,
        server: GrpcServer,
        core: InferenceCore,
        build: Callable[[], object] | None,
        metrics: InferenceMetrics,
        max_restarts: int = 2,
        window_s: float = 600.0,
        poll_s: float = 0.5,
    ) -> None:
        self.server, self.core, self.build, self.metrics = server, core, build, metrics
        self.max_restarts, self.window_s, self.poll_s = max_restarts, window_s, poll_s
        self.restarts: list[float] = []
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.core.engine.dead:
                await self._recover()

    async def _recover(self) -> None:
        await self.server.set_serving(False)
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.window_s]
        if self.build is None:
            self.server.fail("the inference engine died (a shared engine: not rebuilt here)")
            await asyncio.Event().wait()
        if len(self.restarts) >= self.max_restarts:
            self.server.fail(f"the inference engine died {len(self.restarts) + 1} times in {self.window_s:.0f}s")
            await asyncio.Event().wait()
        self.restarts.append(now)
        log.error("the inference engine died; rebuilding it (restart %d)", len(self.restarts))
        with contextlib.suppress(Exception):
            self.core.engine.shutdown()
        gc.unfreeze()  # the dead engine's objects become collectable again; build() freezes the new heap
        try:
            assert self.build is not None
            engine = await asyncio.to_thread(self.build)
        except Exception as exc:
            self.server.fail(f"the inference engine died and could not be rebuilt: {exc}")
            await asyncio.Event().wait()
        self.core.engine = engine
        for entry in self.core.cache.entries.values():
            entry.loaded = False  # the new engine has loaded nothing yet
        self.metrics.engine_restarts.inc()
        await self.server.set_serving(True)
        log.info("the inference engine is back")


async def build_server(settings: InferenceSettings, engine=None) -> GrpcServer:
    """`engine` lets tests share one engine across servers; normally it is built (and rebuilt) here."""
    base_model = await asyncio.to_thread(default_base_model, settings)
    work = settings.data_dir / "inference"
    owns_engine = engine is None
    build: Callable[[], object] | None = None
    if owns_engine:
        from services.inference.engine import Engine, EngineOptions

        options = EngineOptions(
            base_model=base_model,
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len,
            dtype=settings.dtype,
            kv_cache_gib=settings.kv_cache_gib,
            work_dir=work,
            isolation=settings.isolation,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tool_parser=settings.tool_parser,
            json_whitespace=settings.json_whitespace,
        )

        def build_engine() -> Engine:
            built = Engine(options)
            freeze_heap()
            return built

        build = build_engine
        engine = await asyncio.to_thread(build_engine)
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    server = GrpcServer(settings, [], roles=method_roles(service, ROLES))
    metrics = InferenceMetrics.create(
        server.metrics.registry, settings.metrics_adapter_labels, settings.metrics_adapter_series
    )
    metrics.isolation.labels(engine.isolation).set(1)
    registry = RegistryClient(settings.registry_address, timeout=30, token=read_token(settings.registry_token_file))
    resolver = AdapterResolver(registry, ttl_s=settings.resolve_ttl_s)
    local = resolve_local_base(base_model)
    cache = AdapterCache(
        work / "adapters",
        registry,
        settings.adapter_cache_mb * 1024 * 1024,
        settings.max_lora_rank,
        await asyncio.to_thread(base_fingerprint, base_model),
        base_model,
        await asyncio.to_thread(base_module_shapes, local) if local is not None else {},
        metrics,
    )
    limits = Limits(
        max_tokens=settings.max_tokens_limit,
        max_prompt_chars=settings.max_prompt_chars,
        max_model_len=settings.max_model_len,
    )
    # Two waves of adapters: the engine's slots, and the next wave queued behind them (scheduler.py).
    scheduler = AdapterScheduler(2 * settings.max_loras, settings.admission_max_wait_s, metrics)
    core = InferenceCore(engine, resolver, cache, metrics, limits, scheduler, settings.warm_window_s)
    info = {
        "version": __version__,
        "base_model": settings.base_model or base_model,
        "base_fingerprint": cache.base_fingerprint,
        "architecture": architecture_of(local),
        "max_model_len": settings.max_model_len,
        "max_loras": settings.max_loras,
        "max_cpu_loras": settings.max_cpu_loras,
        "max_lora_rank": settings.max_lora_rank,
        "max_tokens_limit": settings.max_tokens_limit,
        "max_prompt_chars": settings.max_prompt_chars,
        "device": await asyncio.to_thread(device_kind),
        "routing_key": ROUTING_KEY,
        "tool_parser": engine.tool_parser,
    }
    server.bindings = [
        ServiceBinding(
            service.full_name, InferenceServicer(core, info), inference_pb2_grpc.add_InferenceServiceServicer_to_server
        )
    ]
    catalog = ModelCatalog(registry, served_model_name(settings, base_model), cache.base_fingerprint)
    info["openai_base_url"] = ""
    if settings.http_port >= 0:
        front = OpenAIFront(
            core,
            catalog,
            server.authenticator,
            server.metrics,
            base_model,
            max_streams=settings.max_streams_per_principal,
            streams=server.auth.streams,  # one count per caller across both fronts
            rpc_timeout_s=settings.rpc_timeout_s,
            fine_tuning_url=settings.fine_tuning_url,
            # The caller's token goes with each call: a channel of its own, without the service's.
            registry=RegistryFront(RegistryClient(settings.registry_address, timeout=30, token=None)),
            info=info,
            peers_srv=settings.peers_srv,
            peers_nameserver=settings.peers_nameserver,
            scheme="https" if settings.tls_cert_file else "http",
        )
        http = HttpServer(
            build_app(front), settings.host, settings.http_port, settings.tls_cert_file, settings.tls_key_file
        )

        async def start_http() -> None:
            server.http_port = await http.start()
            scheme = "https" if settings.tls_cert_file else "http"
            info["openai_base_url"] = f"{scheme}://{server.address.rsplit(':', 1)[0]}:{server.http_port}/v1"

        server.after_start.append(start_http)
        server.on_stop.insert(0, http.stop)
    stop = threading.Event()
    loop = asyncio.get_running_loop()

    def warm_on_promote(event) -> None:
        """An alias moved, or a version was published (`latest` moved): a replica that serves the name loads
        the version it now points at, so the first request after a promotion finds it warm."""
        catalog.invalidate()  # /v1/models lists what the registry holds now
        promoted = event.type in (rpb.EVENT_TYPE_ALIAS_MOVED, rpb.EVENT_TYPE_PUBLISHED)
        if settings.warm_on_promote and promoted and core.owns(event.name):
            asyncio.run_coroutine_threadsafe(core.warm(f"{event.name}:{event.version}"), loop)

    watch_failed = server.metrics.background_errors.labels("registry-watch").inc
    threading.Thread(
        target=resolver.follow, args=(stop, warm_on_promote, watch_failed), daemon=True, name="registry-watch"
    ).start()
    supervisor = EngineSupervisor(server, core, build, metrics)
    server.after_start.append(supervisor.start)
    server.on_stop.insert(0, supervisor.stop)
    server.on_stop.append(stop.set)
    server.on_stop.append(resolver.close)
    server.on_stop.append(registry.close)
    if owns_engine:
        server.on_stop.append(lambda: core.engine.shutdown())
        server.on_stop.append(gc.unfreeze)  # exit collects as usual (extensions check for leaks at exit)
    server.core = core
    return server
