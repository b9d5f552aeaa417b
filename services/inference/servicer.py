"""gRPC servicer of the inference service: proto <-> core."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from grpc import aio

from services.inference.core import GenerateInput, InferenceCore, LoadedAdapter, ResponseFormat, TokenLogprob
from tunedock.errors import InvalidArgument
from tunedock.v1 import inference_pb2 as pb
from tunedock.v1 import inference_pb2_grpc

FINISH = {
    "": pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}


def message_from_proto(m: pb.ChatMessage) -> dict:
    """OpenAI's message shape (the core's), from the proto's."""
    message: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    if m.name:
        message["name"] = m.name
    return message


def tool_from_proto(i: int, t: pb.Tool) -> dict:
    function: dict = {"name": t.name}
    if t.description:
        function["description"] = t.description
    if t.parameters:
        try:
            function["parameters"] = json.loads(t.parameters)
        except json.JSONDecodeError:
            raise InvalidArgument(f"tools[{i}].parameters is not valid JSON (send the JSON Schema as text)") from None
    return {"type": "function", "function": function}


def response_format_from_proto(f: pb.ResponseFormat) -> ResponseFormat | None:
    if not f.type or f.type == "text":
        return None
    schema = None
    if f.json_schema:
        try:
            schema = json.loads(f.json_schema)
        except json.JSONDecodeError:
            raise InvalidArgument(
                "response_format.json_schema is not valid JSON (send the JSON Schema as text)"
            ) from None
    return ResponseFormat(f.type, schema)


def logprobs_to_proto(logprobs: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=lp.token,
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs or ()
    ]


def to_input(params: pb.GenerateParams) -> GenerateInput:
    s = params.sampling
    # Unset (zero) fields take GenerateInput's defaults (a dataclass's class attributes).
    choice: str | dict = params.tool_choice or "auto"
    if params.tool_choice_function:
        choice = {"type": "function", "function": {"name": params.tool_choice_function}}
    return GenerateInput(
        prompt=params.prompt,
        messages=[message_from_proto(m) for m in params.messages.messages],
        tools=[tool_from_proto(i, t) for i, t in enumerate(params.tools)],
        tool_choice=choice,
        response_format=response_format_from_proto(params.response_format),
        adapter=params.adapter,
        temperature=s.temperature,
        top_p=s.top_p or GenerateInput.top_p,
        top_k=s.top_k,
        max_tokens=s.max_tokens or GenerateInput.max_tokens,
        stop=list(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        n=s.n or GenerateInput.n,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=(
            s.repetition_penalty if s.HasField("repetition_penalty") else GenerateInput.repetition_penalty
        ),
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
    )


def loaded_to_proto(loaded: LoadedAdapter) -> pb.LoadedAdapter:
    entry = loaded.entry
    state = pb.ADAPTER_CACHE_STATE_LOADED if entry.loaded else pb.ADAPTER_CACHE_STATE_CACHED
    msg = pb.LoadedAdapter(
        name=entry.resolved.name,
        version=entry.resolved.version,
        content_sha256=entry.resolved.content_sha256,
        lora_int_id=loaded.lora_id,
        state=state,
        pinned=entry.pinned,
        in_flight=entry.in_flight,
        size=entry.size,
    )
    msg.last_used_time.FromSeconds(int(entry.last_used))
    return msg


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore, info: dict | None = None) -> None:
        self.info = info or {}
        """GetInferenceInfo's fields fixed at start-up (base, limits); the engine's are read per call."""
        self.core = core

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        async for d in self.core.generate(to_input(request.params)):
            yield pb.GenerateResponse(
                index=d.index,
                text_delta=d.text,
                completion_tokens=d.completion_tokens,
                prompt_tokens=d.prompt_tokens,
                finish_reason=FINISH.get(d.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                adapter_version=d.adapter_version,
                logprobs=logprobs_to_proto(d.logprobs),
                tool_calls=[
                    pb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments) for c in d.tool_calls
                ],
            )

    async def GenerateUnary(
        self, request: pb.GenerateUnaryRequest, context: aio.ServicerContext
    ) -> pb.GenerateUnaryResponse:
        done = await self.core.complete(to_input(request.params))
        reply = pb.GenerateUnaryResponse(
            prompt_tokens=done.prompt_tokens,
            adapter_version=done.adapter_version,
            completions=[
                pb.Completion(
                    index=c.index,
                    text=c.text,
                    token_ids=c.token_ids,
                    finish_reason=FINISH.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                    logprobs=logprobs_to_proto(c.logprobs),
                    tool_calls=[pb.ToolCall(id=t.id, name=t.name, arguments=t.arguments) for t in c.tool_calls],
                )
                for c in done.choices
            ],
            prompt_logprobs=logprobs_to_proto([lp for lp in done.prompt_logprobs or () if lp is not None]),
        )
        reply.time_to_first_token.FromNanoseconds(int(done.time_to_first_token_s * 1e9))
        return reply

    async def PreloadAdapter(
        self, request: pb.PreloadAdapterRequest, context: aio.ServicerContext
    ) -> pb.PreloadAdapterResponse:
        entries = await self.core.preload(list(request.adapters), request.pin)
        return pb.PreloadAdapterResponse(adapters=[loaded_to_proto(e) for e in entries])

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        return pb.UnloadAdapterResponse(unloaded=await self.core.unload(request.adapter))

    async def ListLoadedAdapters(
        self, request: pb.ListLoadedAdaptersRequest, context: aio.ServicerContext
    ) -> pb.ListLoadedAdaptersResponse:
        state = self.core.state()
        return pb.ListLoadedAdaptersResponse(
            adapters=[loaded_to_proto(a) for a in state.adapters],
            isolation_mode=state.isolation_mode,
            isolation_detail=state.isolation_detail,
            queued_requests=state.queued_requests,
        )

    async def GetInferenceInfo(
        self, request: pb.GetInferenceInfoRequest, context: aio.ServicerContext
    ) -> pb.GetInferenceInfoResponse:
        state = self.core.state()
        return pb.GetInferenceInfoResponse(
            **self.info,
            dtype=state.dtype,
            isolation_mode=state.isolation_mode,
            has_chat_template=state.has_chat_template,
        )
