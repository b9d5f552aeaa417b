"""Inference core: validate a request, resolve its adapter, admit it, run it on the engine (no grpc).

Admission is adapter-aware (scheduler.py): the engine works on at most `max_loras` adapters at a
time, so swapping adapters in and out of its slots never eats the throughput. Unary calls ask the
engine for the final output only; streams get deltas.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from services.common.auth import principal
from services.inference.adapters import AdapterCache, AdapterResolver, CachedAdapter, LoraIds, ResolvedAdapter
from services.inference.scheduler import AdapterScheduler
from tunedock.errors import InvalidArgument, NotFound, TuneDockError
from tunedock.refs import Ref

log = logging.getLogger(__name__)

NULL_SLOT = "__base__"


@dataclass
class GenerateInput:
    prompt: str = ""
    messages: list[dict] = field(default_factory=list)
    adapter: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    stream: bool = True
    """Deltas as they come (Generate); False: the final output only (GenerateUnary)."""


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str  # "" | stop | length | abort
    adapter_version: str


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass(frozen=True)
class Completion:
    """A unary request's whole answer: every choice, aggregated in the core for every front."""

    prompt_tokens: int
    adapter_version: str
    choices: list[Choice]
    time_to_first_token_s: float


@dataclass(frozen=True)
class LoadedAdapter:
    entry: CachedAdapter
    lora_id: int
    """The engine's id of this content (LoraIds)."""


@dataclass(frozen=True)
class EngineState:
    """What the engine serves now (it is replaced when it dies and is rebuilt)."""

    dtype: str
    isolation_mode: str
    isolation_detail: str
    has_chat_template: bool
    queued_requests: int
    adapters: list[LoadedAdapter]


@dataclass
class Limits:
    max_tokens: int = 4096
    max_prompt_chars: int = 200_000
    max_n: int = 8


class InferenceCore:
    def __init__(
        self,
        engine,
        resolver: AdapterResolver,
        cache: AdapterCache,
        metrics,
        limits: Limits,
        scheduler: AdapterScheduler,
        warm_window_s: float = 86400.0,
        lora_ids: LoraIds | None = None,
    ) -> None:
        self.engine = engine
        """Replaced by the server's supervisor when the engine dies and is rebuilt."""
        self.resolver = resolver
        self.cache = cache
        self.metrics = metrics
        self.limits = limits
        self.scheduler = scheduler
        self.served: dict[str, float] = {}
        """Adapter name -> when this replica last served it: the names a proxy hashes here."""
        self.warm_window_s = warm_window_s
        """How long a served name counts as owned here (`owns`); older entries are dropped."""
        self._prune_at = 1024
        self.lora_ids = lora_ids or LoraIds()
        """Content hash -> the engine's adapter id (collision-free; kept across engine rebuilds)."""

    def _validate(self, req: GenerateInput) -> str:
        if bool(req.prompt) == bool(req.messages):
            raise InvalidArgument("give exactly one of prompt or messages")
        if req.messages:
            for i, m in enumerate(req.messages):
                if m["role"] not in ("system", "user", "assistant"):
                    raise InvalidArgument(f"message {i}: role must be system, user or assistant, got {m['role']!r}")
        if not 1 <= req.max_tokens <= self.limits.max_tokens:
            raise InvalidArgument(f"max_tokens must be in 1..{self.limits.max_tokens}, got {req.max_tokens}")
        if not 1 <= req.n <= self.limits.max_n:
            raise InvalidArgument(f"n must be in 1..{self.limits.max_n}, got {req.n}")
        if not 0 <= req.temperature <= 2 or not 0 < req.top_p <= 1 or req.top_k < 0:
            raise InvalidArgument("temperature must be in [0, 2], top_p in (0, 1], top_k >= 0")
        if req.n > 1 and req.temperature == 0:
            raise InvalidArgument(f"n={req.n} needs temperature > 0: greedy decoding gives one completion")
        if any(not s for s in req.stop):
            raise InvalidArgument("stop strings must not be empty")
        prompt = req.prompt or self.engine.prompt_from_messages(req.messages)
        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidArgument(f"prompt is {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}")
        return prompt

    async def acquire_adapter(self, ref: str, pin: bool = False) -> tuple[ResolvedAdapter, CachedAdapter]:
        """Resolve `ref` and hold its files; the entry is shared by every ref with the same content.

        The common case (known ref, files checked and on disk) runs inline; only a miss goes to a
        thread, where the registry and the disk are waited on.
        """
        started = time.perf_counter()
        resolved = await self.resolve_for_caller(ref)
        self.metrics.adapter_resolve.observe(time.perf_counter() - started)
        entry = self.cache.acquire_cached(resolved, pin)
        if entry is None:
            entry = await asyncio.to_thread(self.cache.acquire, resolved, pin)
        return resolved, entry

    async def resolve_for_caller(self, ref: str) -> ResolvedAdapter:
        """Resolve with the service's own registry token, then apply the caller's projects: an adapter
        the caller may not read gets exactly the answer a missing one gets (no existence leak)."""
        resolved = self.resolver.cached(ref)
        if resolved is None:
            resolved = await asyncio.to_thread(self.resolver.resolve, ref)
        if not principal().may_access(resolved.project):
            raise NotFound(f"adapter {ref!r}: artifact {Ref.parse(ref).name!r} not found")
        return resolved

    def _slot(self, entry: CachedAdapter | None) -> str | None:
        """The scheduler key of a request: its adapter's content, the zero adapter, or none."""
        if entry is not None:
            return entry.resolved.content_sha256
        return NULL_SLOT if self.engine.base_takes_a_slot else None

    async def generate(self, req: GenerateInput) -> AsyncIterator[Delta]:
        prompt = self._validate(req)
        resolved, entry = (await self.acquire_adapter(req.adapter)) if req.adapter else (None, None)
        if resolved is not None:
            self.note_served(resolved.name)
        try:
            async with self.scheduler.admit(self._slot(entry)):
                async for delta in self._run(prompt, req, resolved, entry):
                    yield delta
        finally:
            if entry:
                self._release(entry)

    def _release(self, entry: CachedAdapter) -> None:
        """Release on the event loop; an eviction it calls for deletes files, so it runs in a thread."""
        if self.cache.release(entry, evict=False):
            asyncio.get_running_loop().run_in_executor(None, self.cache.evict)

    async def complete(self, req: GenerateInput) -> Completion:
        """The final output of every choice (the engine is asked for it once, not a delta per token)."""
        started = time.perf_counter()
        req = replace(req, stream=False)
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[int]] = {}
        finish: dict[int, str] = {}
        prompt_tokens, adapter, ttft = 0, "", None
        async for d in self.generate(req):
            ttft = ttft if ttft is not None else time.perf_counter() - started
            texts.setdefault(d.index, []).append(d.text)
            tokens.setdefault(d.index, []).extend(d.token_ids)
            finish[d.index] = d.finish_reason or finish.get(d.index, "")
            prompt_tokens, adapter = d.prompt_tokens, d.adapter_version
        choices = [Choice(i, "".join(texts[i]), tokens[i], finish[i]) for i in sorted(texts)]
        return Completion(prompt_tokens, adapter, choices, ttft or 0.0)

    def state(self) -> EngineState:
        engine = self.engine
        return EngineState(
            dtype=engine.dtype,
            isolation_mode=engine.isolation,
            isolation_detail=engine.isolation_why,
            has_chat_template=bool(getattr(engine.tokenizer, "chat_template", None)),
            queued_requests=self.scheduler.queued,
            adapters=self.loaded(),
        )

    async def _run(self, prompt: str, req: GenerateInput, resolved, entry) -> AsyncIterator[Delta]:
        engine = self.engine
        lora = None
        label = resolved.ref if resolved else ""  # this request's ref; the entry is shared by identical content
        if entry:
            lora = engine.lora_request(
                entry.resolved.ref, self.lora_ids(entry.resolved.content_sha256), str(entry.path)
            )
            self.metrics.adapter_requests.labels(resolved.name).inc()
        sampling = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k or -1,
            "max_tokens": req.max_tokens,
            "stop": req.stop or None,
            "seed": req.seed,
            "n": req.n,
        }
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        first = True
        counts = [0] * req.n
        finished = False
        self.metrics.in_flight.inc()
        try:
            async for output in engine.generate(prompt, sampling, request_id, lora, stream=req.stream):
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - started)
                    if entry and not entry.loaded:
                        entry.loaded = True
                        self.metrics.adapter_load.observe(time.perf_counter() - started)
                    first = False
                prompt_tokens = len(output.prompt_token_ids or ())
                for completion in output.outputs:
                    n = len(completion.token_ids)
                    counts[completion.index] += n
                    self.metrics.tokens.inc(n)
                    yield Delta(
                        completion.index,
                        completion.text,
                        list(completion.token_ids),
                        counts[completion.index],
                        prompt_tokens,
                        completion.finish_reason or "",
                        label,
                    )
            finished = True
        finally:
            self.metrics.in_flight.dec()
            if not finished:
                await engine.abort(request_id)  # the client went away: free the engine's slot

    async def preload(self, refs: list[str], pin: bool) -> list[LoadedAdapter]:
        entries = []
        for ref in refs:
            _, entry = await self.acquire_adapter(ref, pin)
            try:
                # A one-token request makes the engine load the weights now, not on first use.
                async with self.scheduler.admit(self._slot(entry)):
                    lora = self.engine.lora_request(
                        entry.resolved.ref, self.lora_ids(entry.resolved.content_sha256), str(entry.path)
                    )
                    sampling = {"max_tokens": 1, "temperature": 0.0}
                    async for _ in self.engine.generate(".", sampling, uuid.uuid4().hex, lora, stream=False):
                        pass
                entry.loaded = True
            finally:
                await asyncio.to_thread(self.cache.release, entry)
            entries.append(LoadedAdapter(entry, self.lora_ids(entry.resolved.content_sha256)))
        return entries

    def note_served(self, name: str) -> None:
        """Remember that `name` was served now; names not served within the window are forgotten
        once the map has doubled since the last sweep (amortized O(1), bounded by the names of a window)."""
        now = time.monotonic()
        self.served[name] = now
        if len(self.served) >= self._prune_at:
            self.served = {n: t for n, t in self.served.items() if now - t <= self.warm_window_s}
            self._prune_at = max(1024, 2 * len(self.served))

    def owns(self, name: str) -> bool:
        """Whether this replica served `name` in the last `warm_window_s` seconds.

        Behind the affinity proxy (deploy/haproxy) the requests for a name land on the replica its
        hash picks, so the replicas that served it are the ones that will serve its next version:
        no replica needs to recompute the proxy's hash ring to know what it owns.
        """
        last = self.served.get(name)
        return last is not None and time.monotonic() - last <= self.warm_window_s

    async def warm(self, ref: str) -> None:
        """Load `ref` into the engine ahead of its first request (an alias moved to it, or it was published)."""
        try:
            await self.preload([ref], pin=False)
            self.metrics.adapters_warmed.inc()
            log.info("warmed %s after its promotion", ref)
        except TuneDockError as exc:  # not servable here (another base, too large): its requests will say so
            log.info("did not warm %s: %s", ref, exc.message)

    async def unload(self, ref: str) -> bool:
        resolved = await self.resolve_for_caller(ref)
        entry = await asyncio.to_thread(self.cache.drop, resolved.content_sha256)
        removed = await self.engine.remove_lora(self.lora_ids(resolved.content_sha256))
        return entry is not None or bool(removed)

    def loaded(self) -> list[LoadedAdapter]:
        return [LoadedAdapter(e, self.lora_ids(e.resolved.content_sha256)) for e in list(self.cache.entries.values())]
