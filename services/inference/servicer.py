"""gRPC servicer of the inference service: proto <-> core."""

from __future__ import annotations

import time

from services.inference.adapters import lora_int_id
from services.inference.core import GenerateInput, InferenceCore
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
    return GenerateInput(
        prompt=params.prompt,
        messages=[{"role": m.role, "content": m.content} for m in params.messages.messages],
        adapter=params.adapter,
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        max_tokens=s.max_tokens or 64,
        stop=list(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        n=s.n or 1,
    )


def loaded_to_proto(entry) -> pb.LoadedAdapter:
    state = pb.ADAPTER_CACHE_STATE_LOADED if entry.loaded else pb.ADAPTER_CACHE_STATE_CACHED
    msg = pb.LoadedAdapter(
        name=entry.resolved.name,
        version=entry.resolved.version,
        content_sha256=entry.resolved.content_sha256,
        lora_int_id=lora_int_id(entry.resolved.content_sha256),
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

    async def Generate(self, request, context):
        async for d in self.core.generate(to_input(request.params)):
            yield pb.GenerateResponse(
                index=d.index,
                text_delta=d.text,
                completion_tokens=d.completion_tokens,
                prompt_tokens=d.prompt_tokens,
                finish_reason=FINISH.get(d.finish_reason, 0),
                adapter_version=d.adapter_version,
            )

    async def GenerateUnary(self, request, context):
        started = time.perf_counter()
        req = to_input(request.params)
        req.stream = False  # one final output from the engine instead of a delta per token
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[int]] = {}
        finish: dict[int, str] = {}
        prompt_tokens, adapter, ttft = 0, "", None
        async for d in self.core.generate(req):
            ttft = ttft if ttft is not None else time.perf_counter() - started
            texts.setdefault(d.index, []).append(d.text)
            tokens.setdefault(d.index, []).extend(d.token_ids)
            finish[d.index] = d.finish_reason or finish.get(d.index, "")
            prompt_tokens, adapter = d.prompt_tokens, d.adapter_version
        reply = pb.GenerateUnaryResponse(
            prompt_tokens=prompt_tokens,
            adapter_version=adapter,
            completions=[
                pb.Completion(
                    index=i, text="".join(texts[i]), token_ids=tokens[i], finish_reason=FINISH.get(finish[i], 0)
                )
                for i in sorted(texts)
            ],
        )
        reply.time_to_first_token.FromNanoseconds(int((ttft or 0) * 1e9))
        return reply

    async def PreloadAdapter(self, request, context):
        entries = await self.core.preload(list(request.adapters), request.pin)
        return pb.PreloadAdapterResponse(adapters=[loaded_to_proto(e) for e in entries])

    async def UnloadAdapter(self, request, context):
        return pb.UnloadAdapterResponse(unloaded=await self.core.unload(request.adapter))

    async def ListLoadedAdapters(self, request, context):
        engine = self.core.engine
        return pb.ListLoadedAdaptersResponse(
            adapters=[loaded_to_proto(e) for e in self.core.loaded()],
            isolation_mode=engine.isolation,
            isolation_detail=engine.isolation_why,
            queued_requests=self.core.scheduler.queued,
        )

    async def GetInferenceInfo(self, request, context):
        engine = self.core.engine
        return pb.GetInferenceInfoResponse(
            **self.info,
            dtype=engine.dtype,
            isolation_mode=engine.isolation,
            has_chat_template=bool(getattr(engine.tokenizer, "chat_template", None)),
        )
