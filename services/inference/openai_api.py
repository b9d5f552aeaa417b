"""The OpenAI-compatible HTTP front of an inference replica: /v1/models, /v1/chat/completions, /v1/completions.

A thin front, as the gRPC servicer is: it parses bodies with vLLM's own OpenAI protocol models
(every field the OpenAI API and vLLM's server accept, validated the same way), turns them into
the core's `GenerateInput`, and writes the core's answers in OpenAI's shapes, streamed as
server-sent events when asked. What is TuneDock's lives in the core: `model` picks the base or
an adapter ref ("name", "name:3", "name@alias"), resolved in the registry and admitted by
adapter; the caller's projects decide what it may see; tools go through the base's chat template
as training renders them. Errors are OpenAI's shape with the HTTP twin of the gRPC status
(services/common/openai_errors.py); an `api_key` is a TuneDock token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services import console
from services.common.auth import Authenticator, Principal, current_principal
from services.common.http import HttpError, authenticate, forward, openai_app
from services.common.openai_errors import error_body, from_domain
from services.inference import peers, registry_api
from services.inference.catalog import ModelCatalog
from services.inference.core import Completion, Delta, GenerateInput, InferenceCore, ResponseFormat, TokenLogprob
from services.inference.registry_api import RegistryFront
from tunedock import errors

log = logging.getLogger(__name__)

GENERATE_ROLE = "inference.generate"


@dataclass
class OpenAIFront:
    core: InferenceCore
    catalog: ModelCatalog
    authenticator: Authenticator | None
    metrics: object = None
    """ServerMetrics: requests counted as service "openai", method = the path."""
    base_model: str = ""
    """The base as configured (a path or hub id): accepted as `model` beside the base's id."""
    max_streams: int = 128
    """Streams one caller may have open at once, gRPC's and these together (max_streams_per_principal)."""
    streams: dict[str, int] = field(default_factory=dict)
    """Open streams per caller: the gRPC AuthInterceptor's own count, shared."""
    rpc_timeout_s: float = 600.0
    """Server-side deadline of a reply that is not streamed (rpc_timeout_s, as for unary gRPC calls)."""
    fine_tuning_url: str = ""
    """The trainer's fine-tuning API, forwarded from here (fine_tuning_url); "" forwards nothing."""
    registry: RegistryFront | None = None
    """The registry as the caller (/tunedock/v1/artifacts ...: the console's registry page)."""
    info: dict = field(default_factory=dict)
    """GetInferenceInfo's answer (base, limits, device), for /tunedock/v1/serving."""
    peers_srv: str = ""
    """SRV name of every replica's HTTP port (peers_srv): /tunedock/v1/serving?replicas=1 asks each."""
    peers_nameserver: str = ""
    scheme: str = "http"

    @property
    def base_id(self) -> str:
        return self.catalog.base_id

    # ------------------------------------------------------------------------- plumbing

    def caller(self, request: Request, role: str | None) -> Principal:
        return authenticate(request, self.authenticator, role)

    def adapter_of(self, model: str | None) -> str:
        """The adapter ref a `model` names; "" for the base (its id, the configured base, or none given)."""
        if not model or model in (self.base_id, self.base_model):
            return ""
        return model

    async def _model_named(self, model: str, answer):
        """The core's answer; a `model` that names no adapter says what `model` may be."""
        try:
            return await answer
        except errors.NotFound as exc:
            raise errors.NotFound(
                f"model {model!r} is neither this replica's base ({self.base_id!r}) nor an adapter you can use "
                f"({exc.message}); GET /v1/models lists them"
            ) from None

    async def body(self, request: Request, model_cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the request body must be a JSON object")
        from vllm.exceptions import VLLMValidationError

        try:
            return data, model_cls.model_validate(data)
        except VLLMValidationError as exc:  # vLLM's model validators: the message names the field
            raise HttpError(400, exc.args[0] if exc.args else str(exc), exc.parameter) from None
        except ValueError as exc:  # pydantic's ValidationError (and validators' ValueErrors)
            message, param = _validation_message(exc)
            raise HttpError(400, message, param) from None
        except TypeError as exc:  # a validator that met a value of a type it did not expect
            raise HttpError(400, f"the request body has a value of the wrong type: {exc}") from None
        except (KeyError, IndexError, AttributeError) as exc:  # a validator that met a shape it did not expect
            # e.g. vLLM's tool_choice check reads tools[i]["function"] before the tools are validated
            raise HttpError(
                400,
                f"the request body has a malformed value (missing {exc}): check tools, "
                "tool_choice and messages against the API's schema",
            ) from None

    # ------------------------------------------------------------------------- /v1/models

    async def list_models(self, request: Request) -> dict:
        caller = self.caller(request, None)
        cards = await asyncio.to_thread(self.catalog.visible, caller)
        return {"object": "list", "data": [c.to_openai() for c in cards]}

    async def get_model(self, request: Request, model_id: str) -> dict:
        caller = self.caller(request, None)
        if model_id in (self.base_id, self.base_model):
            return self.catalog.base_card().to_openai()
        token = current_principal.set(caller)
        try:
            resolved = await self.core.resolve_for_caller(model_id)
        finally:
            current_principal.reset(token)
        for card in await asyncio.to_thread(self.catalog.visible, caller):
            if card.id == model_id:
                return card.to_openai()
        # A ref the listing does not spell (e.g. an older alias spelling) but that resolves: describe it.
        return {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": resolved.project,
            "parent": self.base_id,
            "root": self.base_id,
            "tunedock": {"name": resolved.name, "version": resolved.version, "project": resolved.project},
        }

    # ------------------------------------------------------------------ /tunedock/v1/serving

    async def serving(self, request: Request) -> dict:
        """What this replica serves now: its base and limits, slots, queue, recent throughput, and the loaded
        adapters the caller's projects may see (another tenant's stay out, counted only). With `replicas=1`,
        every replica's answer (found through peers_srv, asked with the caller's token)."""
        caller = self.caller(request, None)
        if request.query_params.get("replicas") and self.peers_srv:
            try:
                found = await peers.resolve(self.peers_srv, self.peers_nameserver)
            except Exception as exc:  # dnspython's NXDOMAIN, timeouts, ...: say so, still show this replica
                here = self._serving_here(caller)
                return here | {"replicas": [here], "peers_error": f"{self.peers_srv}: {type(exc).__name__} {exc}"}
            auth = request.headers.get("authorization", "")
            return self._serving_here(caller) | {
                "replicas": await peers.ask_each(found, "/tunedock/v1/serving", auth, self.scheme)
            }
        return self._serving_here(caller)

    def _serving_here(self, caller: Principal) -> dict:
        state = self.core.state()
        adapters = [a for a in state.adapters if caller.may_access(a.entry.resolved.project)]
        keys = ("base_model", "architecture", "device", "max_model_len", "max_loras", "max_cpu_loras", "max_lora_rank")
        return {
            "replica": {k: self.info.get(k) for k in keys}
            | {"version": self.info.get("version"), "base_id": self.base_id},
            "engine": {
                "dtype": state.dtype,
                "isolation": state.isolation_mode,
                "restarting": bool(self.core.engine.dead),
                "queued_requests": state.queued_requests,
                "open_streams": sum(self.streams.values()),
            },
            "adapters": [
                {
                    "ref": a.entry.resolved.ref,
                    "project": a.entry.resolved.project,
                    "rank": a.entry.rank,
                    "bytes": a.entry.size,
                    "in_engine": a.entry.loaded,
                    "in_flight": a.entry.in_flight,
                    "pinned": a.entry.pinned,
                }
                for a in adapters
            ],
            "adapters_loaded": len(state.adapters),
            "throughput": {
                "tokens_per_s_10s": self.core.recent_tokens.rate(10),
                "tokens_per_s_60s": self.core.recent_tokens.rate(60),
                "requests_per_s_10s": self.core.recent_requests.rate(10),
            },
        }

    # ------------------------------------------------------------------ /v1/chat/completions

    async def chat(self, request: Request) -> Response:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        caller = self.caller(request, GENERATE_ROLE)
        data, parsed = await self.body(request, ChatCompletionRequest)
        inp = chat_input(data, parsed, self.adapter_of(parsed.model))
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return await self._answer(caller, inp, bool(parsed.stream), parsed.model or self.base_id, "chat", include_usage)

    # ------------------------------------------------------------------------ /v1/completions

    async def completions(self, request: Request) -> Response:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        caller = self.caller(request, GENERATE_ROLE)
        data, parsed = await self.body(request, CompletionRequest)
        prompts = completion_prompts(data.get("prompt"))
        inputs = [completion_input(parsed, p, self.adapter_of(parsed.model)) for p in prompts]
        model = parsed.model or self.base_id
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        if parsed.stream:
            if len(inputs) != 1:
                raise HttpError(400, "stream takes one prompt; send several prompts without stream", "prompt")
            return await self._answer(caller, inputs[0], True, model, "text", include_usage, echo=parsed.echo)
        token = current_principal.set(caller)
        try:
            done = await self._model_named(model, asyncio.gather(*(self.core.complete(i) for i in inputs)))
        finally:
            current_principal.reset(token)
        return JSONResponse(completion_reply(done, inputs, model, parsed.echo, self.core.engine.tokenizer))

    # ---------------------------------------------------------------------------- shared

    async def _answer(
        self,
        caller: Principal,
        inp: GenerateInput,
        stream: bool,
        model: str,
        kind: str,
        include_usage: bool,
        echo: bool = False,
    ) -> Response:
        token = current_principal.set(caller)
        try:
            if not stream:
                try:
                    async with asyncio.timeout(self.rpc_timeout_s):
                        done = await self._model_named(model, self.core.complete(inp))
                except TimeoutError:
                    raise errors.DeadlineExceeded(
                        f"the server stopped this request after its {self.rpc_timeout_s:g}s deadline; ask for fewer "
                        "tokens, or stream"
                    ) from None
                if kind == "chat":
                    return JSONResponse(chat_reply(done, model))
                return JSONResponse(completion_reply([done], [inp], model, echo, self.core.engine.tokenizer))
            if self.streams.get(caller.name, 0) >= self.max_streams:
                raise errors.ResourceExhausted(
                    f"{caller.name} already has {self.max_streams} open streams; close some and retry"
                )
            deltas = self.core.generate(inp)
            first = await self._model_named(model, anext(deltas))  # errors before the first token get a status
        finally:
            current_principal.reset(token)
        events = chat_events if kind == "chat" else completion_events
        body = events(first, deltas, model, include_usage, inp.n, inp.logprobs is not None)
        return StreamingResponse(
            self._counted(caller, _with_principal(caller, body)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _counted(self, caller: Principal, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The stream, counted against its caller's open streams while it is sent (counted from its first
        chunk: a body never started must not hold a count that nothing would give back)."""
        self.streams[caller.name] = self.streams.get(caller.name, 0) + 1
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.streams[caller.name] -= 1


async def _with_principal(caller: Principal, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream runs in the server's task, after the handler returned: the caller is set again for it."""
    token = current_principal.set(caller)
    try:
        async for chunk in body:
            yield chunk
    finally:
        with contextlib.suppress(ValueError):  # closed from another context
            current_principal.reset(token)


# ------------------------------------------------------------------------------ requests


def _sampling(parsed, inp: GenerateInput) -> None:
    """The fields chat and completions share, OpenAI's defaults where the request leaves them out."""
    inp.temperature = 1.0 if parsed.temperature is None else parsed.temperature
    inp.top_p = 1.0 if parsed.top_p is None else parsed.top_p
    inp.top_k = max(parsed.top_k or 0, 0)
    inp.n = parsed.n or 1
    inp.seed = parsed.seed
    stop = parsed.stop or []
    inp.stop = [stop] if isinstance(stop, str) else list(stop)
    inp.presence_penalty = parsed.presence_penalty or 0.0
    inp.frequency_penalty = parsed.frequency_penalty or 0.0
    inp.repetition_penalty = parsed.repetition_penalty or 1.0
    inp.stream = bool(parsed.stream)


def chat_input(data: dict, parsed, adapter: str) -> GenerateInput:
    """A chat request in the core's terms. Messages are taken as sent (the core normalises them, as
    training does); everything else from vLLM's validated model."""
    inp = GenerateInput(messages=list(data.get("messages") or []), adapter=adapter)
    _sampling(parsed, inp)
    inp.max_tokens = parsed.max_completion_tokens or parsed.max_tokens or None
    if parsed.logprobs:
        inp.logprobs = parsed.top_logprobs or 0
    if parsed.tools:
        inp.tools = [t.model_dump(exclude_none=True) for t in parsed.tools]
        choice = parsed.tool_choice
        if choice is None:
            inp.tool_choice = "auto"
        elif isinstance(choice, str):
            inp.tool_choice = choice
        else:
            inp.tool_choice = choice.model_dump(exclude_none=True)
    elif isinstance(parsed.tool_choice, str) and parsed.tool_choice not in ("none", "auto"):
        raise HttpError(400, f"tool_choice {parsed.tool_choice!r} needs tools", "tool_choice")
    inp.response_format = response_format(parsed.response_format)
    return inp


def response_format(fmt) -> ResponseFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat("json_object")
    if fmt.type == "json_schema":
        schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
        return ResponseFormat("json_schema", schema)
    raise HttpError(400, f"response_format type {fmt.type!r} is not served: use text, json_object or json_schema")


def completion_prompts(prompt) -> list[str | list[int]]:
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise HttpError(
        400, "prompt must be a non-empty string, a list of strings, token ids, or a list of token-id lists", "prompt"
    )


def completion_input(parsed, prompt: str | list[int], adapter: str) -> GenerateInput:
    inp = GenerateInput(adapter=adapter)
    if isinstance(prompt, str):
        inp.prompt = prompt
    else:
        inp.prompt_token_ids = prompt
    _sampling(parsed, inp)
    inp.max_tokens = parsed.max_tokens if parsed.max_tokens is not None else 16  # OpenAI's default
    if parsed.logprobs is not None:
        inp.logprobs = parsed.logprobs
        if parsed.echo:
            inp.prompt_logprobs = parsed.logprobs
    inp.response_format = response_format(parsed.response_format)
    return inp


def _validation_message(exc: Exception) -> tuple[str, str | None]:
    found = exc.errors() if callable(getattr(exc, "errors", None)) else []  # type: ignore[attr-defined]
    if not found:
        return str(exc), None
    first = found[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


# ------------------------------------------------------------------------------- replies


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top],
            }
            for lp in logprobs
        ]
    }


def chat_reply(done: Completion, model: str) -> dict:
    choices = []
    for c in done.choices:
        message: dict = {"role": "assistant", "content": c.text if (c.text or not c.tool_calls) else None}
        if c.tool_calls:
            message["tool_calls"] = [
                {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                for t in c.tool_calls
            ]
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": _chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason or "stop",
            }
        )
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": done.adapter_version or model,
        "choices": choices,
        "usage": _usage(done.prompt_tokens, sum(len(c.token_ids) for c in done.choices)),
    }


def _text_logprobs(entries: list[TokenLogprob | None], tokens: list[str], offset: int) -> dict:
    """OpenAI completions' logprobs: parallel lists of tokens, their logprobs, top alternatives, text offsets."""
    token_logprobs: list[float | None] = []
    top: list[dict | None] = []
    offsets = []
    for token, lp in zip(tokens, entries, strict=True):
        offsets.append(offset)
        offset += len(token)
        token_logprobs.append(None if lp is None else lp.logprob)
        if lp is None:
            top.append(None)
        else:
            alternatives = dict(lp.top)
            alternatives.setdefault(lp.token, lp.logprob)  # the chosen token is among them, as OpenAI's are
            top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_reply(done: list[Completion], inputs: list[GenerateInput], model: str, echo: bool, tokenizer) -> dict:
    choices = []
    prompt_tokens = completion_tokens = 0
    adapter = ""
    for p, (answer, inp) in enumerate(zip(done, inputs, strict=True)):
        prompt_tokens += answer.prompt_tokens
        adapter = adapter or answer.adapter_version
        prompt_text = inp.prompt if inp.prompt else (tokenizer.decode(answer.prompt_token_ids) if echo else "")
        for c in answer.choices:
            completion_tokens += len(c.token_ids)
            text = (prompt_text + c.text) if echo else c.text
            logprobs = None
            if inp.logprobs is not None:
                entries: list[TokenLogprob | None] = list(c.logprobs or [])
                tokens = [lp.token for lp in c.logprobs or []]
                if echo:
                    prompt_entries = list(answer.prompt_logprobs or [])
                    first: list[TokenLogprob | None] = (
                        [None] if len(prompt_entries) < len(answer.prompt_token_ids) else []
                    )
                    prompt_entries = first + prompt_entries
                    prompt_tokens_text = [
                        lp.token if lp is not None else tokenizer.decode([tid])
                        for tid, lp in zip(answer.prompt_token_ids, prompt_entries, strict=False)
                    ]
                    entries = prompt_entries + entries
                    tokens = prompt_tokens_text + tokens
                logprobs = _text_logprobs(entries, tokens, 0)
            choices.append(
                {
                    "index": p * inp.n + c.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason or "stop",
                }
            )
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": adapter or model,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def _all(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    async for d in rest:
        yield d


async def chat_events(
    first: Delta, rest: AsyncIterator[Delta], model: str, include_usage: bool, n: int, with_logprobs: bool
) -> AsyncIterator[bytes]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    name = first.adapter_version or model
    started = [False] * n
    completion_tokens = [0] * n
    prompt_tokens = first.prompt_tokens
    try:
        async for d in _all(first, rest):
            delta: dict = {}
            if not started[d.index]:
                started[d.index] = True
                delta["role"] = "assistant"
            if d.text or "role" in delta:
                delta["content"] = d.text
            if d.tool_calls:
                delta["tool_calls"] = [_tool_delta(c) for c in d.tool_calls]
            completion_tokens[d.index] = d.completion_tokens
            if not delta and not d.finish_reason and not (with_logprobs and d.logprobs):
                continue
            choice: dict = {
                "index": d.index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": d.finish_reason or None,
            }
            if with_logprobs:
                choice["logprobs"] = _chat_logprobs(d.logprobs or [])
            yield _sse(
                {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [choice]}
            )
        if include_usage:
            usage = _usage(prompt_tokens, sum(completion_tokens))
            yield _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [],
                    "usage": usage,
                }
            )
    except errors.TuneDockError as exc:  # mid-stream: the status line is sent, the error goes as an event
        yield _sse(from_domain(exc)[1])
    yield DONE


def _tool_delta(c) -> dict:
    out: dict = {"index": c.index}
    function: dict = {}
    if c.id:
        out["id"] = c.id
        out["type"] = "function"
    if c.name:
        function["name"] = c.name
    if c.arguments:
        function["arguments"] = c.arguments
    out["function"] = function
    return out


async def completion_events(
    first: Delta, rest: AsyncIterator[Delta], model: str, include_usage: bool, n: int, with_logprobs: bool
) -> AsyncIterator[bytes]:
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    name = first.adapter_version or model
    completion_tokens = [0] * n
    prompt_tokens = first.prompt_tokens
    offsets = [0] * n
    try:
        async for d in _all(first, rest):
            completion_tokens[d.index] = d.completion_tokens
            if not d.text and not d.finish_reason:
                continue
            logprobs = None
            if with_logprobs and d.logprobs is not None:
                tokens = [lp.token for lp in d.logprobs]
                logprobs = _text_logprobs(list(d.logprobs), tokens, offsets[d.index])
            offsets[d.index] += len(d.text)
            choice = {"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason or None}
            yield _sse({"id": cid, "object": "text_completion", "created": created, "model": name, "choices": [choice]})
        if include_usage:
            usage = _usage(prompt_tokens, sum(completion_tokens))
            yield _sse(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": name,
                    "choices": [],
                    "usage": usage,
                }
            )
    except errors.TuneDockError as exc:
        yield _sse(from_domain(exc)[1])
    yield DONE


# ---------------------------------------------------------------------------------- app


def _route(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path.startswith("/v1/") else "other"


def build_app(front: OpenAIFront) -> FastAPI:
    app = openai_app(
        "TuneDock OpenAI-compatible API", front.metrics, _route, "/v1/models, /v1/chat/completions and /v1/completions"
    )

    console.mount(app)  # the web console, over these same routes
    if front.registry is not None:
        registry_api.mount(app, front.registry)
    fine_tuning = ("/v1/files", "/v1/fine_tuning")
    if front.fine_tuning_url:
        forward(app, fine_tuning, front.fine_tuning_url, "the trainer's fine-tuning API")
    else:

        async def elsewhere(request: Request):
            raise HttpError(
                404,
                f"{request.url.path} is the trainer's (files and fine-tuning jobs): send it to the trainer's HTTP "
                "port (--http-port), or start this replica with --fine-tuning-url pointing there",
            )

        for prefix in fine_tuning:
            app.add_api_route(prefix, elsewhere, methods=["GET", "POST", "DELETE"], include_in_schema=False)
            app.add_api_route(
                prefix + "/{rest:path}", elsewhere, methods=["GET", "POST", "DELETE"], include_in_schema=False
            )

    @app.get("/tunedock/v1/serving")
    async def serving(request: Request):
        return JSONResponse(await front.serving(request))

    @app.get("/v1/models")
    async def list_models(request: Request):
        return JSONResponse(await front.list_models(request))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str):
        return JSONResponse(await front.get_model(request, model_id))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await front.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await front.completions(request)

    @app.get("/health")
    async def health():
        if front.core.engine.dead:
            return JSONResponse(error_body(503, "the inference engine is restarting"), status_code=503)
        return Response(status_code=200)

    return app
