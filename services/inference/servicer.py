"""gRPC servicer of the inference service: proto <-> core."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from services.inference.core import GenerateInput, InferenceCore, LoadedAdapter
from tunedock.v1 import inference_pb2 as pb
from tunedock.v1 import inference_pb2_grpc

FINISH = {
    "": pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def to_input(params: pb.GenerateParams) -> GenerateInput:
    s = params.sampling
    # Unset (zero) fields take GenerateInput's defaults (a dataclass's class attributes).
    return GenerateInput(
        prompt=params.prompt,
        messages=[{"role": m.role, "content": m.content} for m in params.messages.messages],
        adapter=params.adapter,
        temperature=s.temperature,
        top_p=s.top_p or GenerateInput.top_p,
        top_k=s.top_k,
        max_tokens=s.max_tokens or GenerateInput.max_tokens,
        stop=list(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        n=s.n or GenerateInput.n,
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
                )
                for c in done.choices
            ],
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
