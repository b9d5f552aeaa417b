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
from services.common.chat import ConversationError, normalize_tools, openai_message
from services.inference.adapters import AdapterCache, AdapterResolver, CachedAdapter, LoraIds, ResolvedAdapter
from services.inference.scheduler import AdapterScheduler
from services.inference.throughput import RecentRate
from services.inference.tools import ToolCall, ToolCallDelta, ToolCalls
from tunedock.errors import InvalidArgument, NotFound, TuneDockError
from tunedock.refs import Ref

log = logging.getLogger(__name__)

NULL_SLOT = "__base__"
MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask for per token (OpenAI's top_logprobs bound)."""


@dataclass
class ResponseFormat:
    """OpenAI's `response_format`: free text, any JSON object, or JSON of a schema (decoding is constrained)."""

    type: str = "text"
    """text | json_object | json_schema."""
    schema: dict | None = None
    """json_schema only: the JSON Schema the reply must match."""


@dataclass
class GenerateInput:
    """One request, as both fronts (gRPC, OpenAI HTTP) hand it to the core."""

    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    """A raw prompt already tokenized (OpenAI completions accept token ids; lm-eval sends them)."""
    messages: list[dict] = field(default_factory=list)
    """OpenAI chat messages: roles system/developer/user/assistant/tool, assistant `tool_calls`, tool
    `tool_call_id`, content a string or text parts (services.common.chat normalises them)."""
    tools: list[dict] = field(default_factory=list)
    """OpenAI tool specs, rendered by the base's chat template as training renders them."""
    tool_choice: str | dict = "auto"
    """none | auto | required | {"type": "function", "function": {"name": ...}} (tools.py)."""
    response_format: ResponseFormat | None = None
    adapter: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 64
    """None: as many as fit (the context left after the prompt, at most the server's max_tokens limit)."""
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    """None: no logprobs; k >= 0: each generated token's logprob and the k most likely alternatives."""
    prompt_logprobs: int | None = None
    """None: none; k >= 0: each prompt token's logprob (and k alternatives): what `echo` + logprobs asks."""
    stream: bool = True
    """Deltas as they come (Generate); False: the final output only (GenerateUnary)."""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    """The most likely tokens at this position, most likely first (as many as were asked for)."""


@dataclass
class Delta:
    index: int
    text: str
    """New content (a tool call's markup is parsed out of it when the request has tools)."""
    token_ids: list[int]
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str  # "" | stop | length | abort | tool_calls
    adapter_version: str
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    """A unary request's whole answer: every choice, aggregated in the core for every front."""

    prompt_tokens: int
    adapter_version: str
    choices: list[Choice]
    time_to_first_token_s: float
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `prompt_logprobs`: one per prompt token (None for the first, which nothing predicts)."""
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass
class Prepared:
    """A validated request: what the engine is given."""

    prompt: str | list[int]
    """Raw prompt text (tokenized by the engine as is), or a rendered chat's token ids."""
    prompt_text: str
    sampling: dict
    tool_calls: ToolCalls | None


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
    max_model_len: int = 0
    """The engine's context length (0: unknown): what a request without max_tokens may fill."""


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
        self.recent_tokens, self.recent_requests = RecentRate(), RecentRate()
        """Generated tokens and finished requests per second of the last minute (the console's Serving page)."""

    def _prepare(self, req: GenerateInput) -> Prepared:
        """Check a request and turn it into the engine's prompt and sampling parameters (InvalidArgument
        naming the field and the allowed values otherwise)."""
        if sum(map(bool, (req.prompt, req.prompt_token_ids, req.messages))) != 1:
            raise InvalidArgument("give exactly one of prompt, prompt token ids or messages")
        if req.max_tokens is not None and not 1 <= req.max_tokens <= self.limits.max_tokens:
            raise InvalidArgument(f"max_tokens must be in 1..{self.limits.max_tokens}, got {req.max_tokens}")
        if not 1 <= req.n <= self.limits.max_n:
            raise InvalidArgument(f"n must be in 1..{self.limits.max_n}, got {req.n}")
        if not 0 <= req.temperature <= 2 or not 0 < req.top_p <= 1 or req.top_k < 0:
            raise InvalidArgument("temperature must be in [0, 2], top_p in (0, 1], top_k >= 0")
        if req.n > 1 and req.temperature == 0:
            raise InvalidArgument(f"n={req.n} needs temperature > 0: greedy decoding gives one completion")
        if any(not s for s in req.stop):
            raise InvalidArgument("stop strings must not be empty")
        if not -2 <= req.presence_penalty <= 2 or not -2 <= req.frequency_penalty <= 2:
            raise InvalidArgument("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not 0 < req.repetition_penalty <= 2:
            raise InvalidArgument(f"repetition_penalty must be in (0, 2], got {req.repetition_penalty}")
        for name, value in (("logprobs", req.logprobs), ("prompt_logprobs", req.prompt_logprobs)):
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise InvalidArgument(f"{name} must be in 0..{MAX_TOP_LOGPROBS} alternatives, got {value}")
        engine = self.engine
        tool_calls = None
        if req.tools and not req.messages:
            raise InvalidArgument("tools need chat messages (the chat template renders them): send messages")
        try:
            tools = normalize_tools(req.tools) if req.tools else []
        except ConversationError as exc:
            raise InvalidArgument(str(exc)) from None
        if not tools and req.tool_choice not in ("auto", "none", ""):
            raise InvalidArgument("tool_choice names a tool, but the request has no tools")
        if req.prompt_token_ids:
            vocab = len(engine.tokenizer)
            if any(not 0 <= t < vocab for t in req.prompt_token_ids):
                raise InvalidArgument(f"prompt token ids must be in 0..{vocab - 1} (the base model's vocabulary)")
            prompt: str | list[int] = list(req.prompt_token_ids)
            text = ""
        elif req.prompt:
            prompt = req.prompt
            text = req.prompt
        else:
            try:
                messages = [openai_message(m, i) for i, m in enumerate(req.messages)]
                text = engine.chat.prompt(messages, tools)
            except ConversationError as exc:
                raise InvalidArgument(str(exc)) from None
            prompt = text
        if tools:  # after rendering: a template that cannot render tools is refused first, saying so
            tool_calls = ToolCalls.build(tools, req.tool_choice, engine.tool_parser, engine.tokenizer)
        if len(text) > self.limits.max_prompt_chars:
            raise InvalidArgument(f"prompt is {len(text)} characters; the limit is {self.limits.max_prompt_chars}")
        sampling: dict = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k or -1,
            "max_tokens": req.max_tokens,
            "stop": req.stop or None,
            "seed": req.seed,
            "n": req.n,
        }
        if req.presence_penalty:
            sampling["presence_penalty"] = req.presence_penalty
        if req.frequency_penalty:
            sampling["frequency_penalty"] = req.frequency_penalty
        if req.repetition_penalty != 1.0:
            sampling["repetition_penalty"] = req.repetition_penalty
        if req.logprobs is not None:
            sampling["logprobs"] = req.logprobs
        if req.prompt_logprobs is not None:
            sampling["prompt_logprobs"] = req.prompt_logprobs
        schema = tool_calls.json_schema() if tool_calls is not None else None
        fmt = req.response_format
        if schema is not None:
            sampling["json_schema"] = schema  # a required or named tool call: its JSON, whatever response_format says
        elif fmt is not None and fmt.type == "json_schema":
            if not isinstance(fmt.schema, dict):
                raise InvalidArgument("response_format json_schema needs json_schema.schema, a JSON Schema object")
            sampling["json_schema"] = fmt.schema
        elif fmt is not None and fmt.type == "json_object":
            sampling["json_object"] = True
        elif fmt is not None and fmt.type != "text":
            raise InvalidArgument(f"response_format type must be text, json_object or json_schema, got {fmt.type!r}")
        if tool_calls is not None and not tool_calls.skip_special_tokens:
            sampling["skip_special_tokens"] = False  # the family's call markers are special tokens
        return Prepared(prompt, text, sampling, tool_calls)

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
        async for delta in self._generate(req):
            yield delta

    async def _generate(self, req: GenerateInput, prompt_info: dict | None = None) -> AsyncIterator[Delta]:
        prepared = self._prepare(req)
        if isinstance(prepared.prompt, str) and (req.messages or req.max_tokens is None):
            # A rendered chat goes to the engine as token ids, tokenized as training tokenizes it; a raw
            # prompt as the engine would tokenize it (the tokenizer's own special tokens added).
            encode = self.engine.chat.encode if req.messages else self.engine.encode
            text = prepared.prompt
            prepared.prompt = await asyncio.to_thread(encode, text) if len(text) > 8192 else encode(text)
        if req.max_tokens is None:
            assert isinstance(prepared.prompt, list)
            room = self.limits.max_model_len - len(prepared.prompt) if self.limits.max_model_len else 1 << 30
            if room < 1:
                raise InvalidArgument(
                    f"the prompt is {len(prepared.prompt)} tokens: it leaves no room to generate within "
                    f"max_model_len {self.limits.max_model_len}; shorten it"
                )
            prepared.sampling["max_tokens"] = min(self.limits.max_tokens, room)
        resolved, entry = (await self.acquire_adapter(req.adapter)) if req.adapter else (None, None)
        if resolved is not None:
            self.note_served(resolved.name)
        try:
            async with self.scheduler.admit(self._slot(entry)):
                async for delta in self._run(prepared, req, resolved, entry, prompt_info):
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
        logprobs: dict[int, list[TokenLogprob]] = {}
        calls: dict[int, list[ToolCall]] = {}
        prompt_info: dict = {}
        prompt_tokens, adapter, ttft = 0, "", None
        async for d in self._generate(req, prompt_info):
            ttft = ttft if ttft is not None else time.perf_counter() - started
            texts.setdefault(d.index, []).append(d.text)
            tokens.setdefault(d.index, []).extend(d.token_ids)
            finish[d.index] = d.finish_reason or finish.get(d.index, "")
            if d.logprobs is not None:
                logprobs.setdefault(d.index, []).extend(d.logprobs)
            for call in d.tool_calls:  # unary: each call arrives whole
                calls.setdefault(d.index, []).append(ToolCall(call.id, call.name, call.arguments))
            prompt_tokens, adapter = d.prompt_tokens, d.adapter_version
        choices = [
            Choice(
                i,
                "".join(texts[i]),
                tokens[i],
                finish[i],
                logprobs.get(i) if req.logprobs is not None else None,
                calls.get(i, []),
            )
            for i in sorted(texts)
        ]
        return Completion(
            prompt_tokens,
            adapter,
            choices,
            ttft or 0.0,
            prompt_info.get("logprobs") if req.prompt_logprobs is not None else None,
            prompt_info.get("token_ids", []),
        )

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

    async def _run(
        self, prepared: Prepared, req: GenerateInput, resolved, entry, prompt_info: dict | None
    ) -> AsyncIterator[Delta]:
        engine = self.engine
        lora = None
        label = resolved.ref if resolved else ""  # this request's ref; the entry is shared by identical content
        if entry:
            lora = engine.lora_request(
                entry.resolved.ref, self.lora_ids(entry.resolved.content_sha256), str(entry.path)
            )
            self.metrics.adapter_requests.labels(self.metrics.adapter_label(resolved.name)).inc()
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        first = True
        counts = [0] * req.n
        parsers = [prepared.tool_calls.fresh() for _ in range(req.n)] if prepared.tool_calls else None
        called = [False] * req.n
        finished = False
        self.metrics.in_flight.inc()
        try:
            async for output in engine.generate(
                prepared.prompt, prepared.sampling, request_id, lora, stream=req.stream
            ):
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - started)
                    if entry and not entry.loaded:
                        entry.loaded = True
                        self.metrics.adapter_load.observe(time.perf_counter() - started)
                    first = False
                    if prompt_info is not None:  # unary callers that asked (complete)
                        prompt_info["token_ids"] = list(output.prompt_token_ids or ())
                        if output.prompt_logprobs is not None:
                            prompt_info["logprobs"] = [
                                None if lp is None else _logprob(token, lp, req.prompt_logprobs or 0)
                                for token, lp in zip(output.prompt_token_ids, output.prompt_logprobs, strict=False)
                            ]
                prompt_tokens = len(output.prompt_token_ids or ())
                for completion in output.outputs:
                    i = completion.index
                    ids = list(completion.token_ids)
                    counts[i] += len(ids)
                    self.metrics.tokens.inc(len(ids))
                    self.recent_tokens.add(len(ids))
                    finish = completion.finish_reason or ""
                    text, call_deltas = completion.text, list[ToolCallDelta]()
                    if parsers is not None:
                        text, call_deltas = _tool_deltas(parsers[i], text, ids, bool(finish), req.stream)
                        called[i] = called[i] or bool(call_deltas)
                        if finish == "stop" and called[i]:
                            finish = "tool_calls"
                    logprobs = None
                    if req.logprobs is not None and completion.logprobs is not None:
                        logprobs = [
                            _logprob(t, lp, req.logprobs) for t, lp in zip(ids, completion.logprobs, strict=False)
                        ]
                    yield Delta(i, text, ids, counts[i], prompt_tokens, finish, label, logprobs, call_deltas)
            finished = True
            self.recent_requests.add()
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


def _logprob(token_id: int, candidates: dict, k: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} at one position -> the chosen token's logprob and the k most likely."""
    chosen = candidates.get(token_id)
    ranked = sorted(candidates.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    top = tuple((lp.decoded_token or "", float(lp.logprob)) for _, lp in ranked[:k])
    if chosen is None:  # not among those returned (cannot happen with vLLM's sampler; kept total)
        return TokenLogprob("", token_id, float("-inf"), top)
    return TokenLogprob(chosen.decoded_token or "", token_id, float(chosen.logprob), top)


def _tool_deltas(
    parser: ToolCalls, text: str, ids: list[int], last: bool, stream: bool
) -> tuple[str, list[ToolCallDelta]]:
    """Content and tool calls of one engine output: streamed deltas, or (unary) the whole completion's calls."""
    if stream:
        content, deltas = parser.stream(text, ids, last)
        for delta in deltas:
            if delta.name and not delta.id:
                delta.id = f"call_{uuid.uuid4().hex[:24]}"
        return content, deltas
    content, calls = parser.final(text)
    return content, [ToolCallDelta(j, c.id, c.name, c.arguments) for j, c in enumerate(calls)]
