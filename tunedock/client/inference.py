"""Inference SDK: generate (streaming or whole), chat, and the adapter admin calls."""

from __future__ import annotations

from collections.abc import Iterator

from tunedock.client.channel import ServiceClient
from tunedock.v1 import inference_pb2 as pb
from tunedock.v1 import inference_pb2_grpc


class InferenceClient(ServiceClient):
    STUB = inference_pb2_grpc.InferenceServiceStub
    DEFAULT_TIMEOUT = 300.0

    @staticmethod
    def params(
        prompt: str = "",
        messages: list[dict] | None = None,
        adapter: str = "",
        max_tokens: int = 64,
        temperature: float = 0.0,
        **sampling,
    ) -> pb.GenerateParams:
        params = pb.GenerateParams(
            adapter=adapter, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, **sampling)
        )
        if messages:
            params.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        else:
            params.prompt = prompt
        return params

    def generate(self, prompt: str = "", adapter: str = "", **kwargs) -> pb.GenerateUnaryResponse:
        """The whole completion (greedy unless temperature > 0)."""
        return self.stub.GenerateUnary(
            pb.GenerateUnaryRequest(params=self.params(prompt, adapter=adapter, **kwargs)), timeout=self.timeout
        )

    def stream(self, prompt: str = "", adapter: str = "", **kwargs) -> Iterator[pb.GenerateResponse]:
        """Text deltas as they are generated."""
        yield from self.stub.Generate(
            pb.GenerateRequest(params=self.params(prompt, adapter=adapter, **kwargs)), timeout=self.timeout
        )

    def preload(self, adapters: list[str], pin: bool = False) -> list[pb.LoadedAdapter]:
        reply = self.stub.PreloadAdapter(pb.PreloadAdapterRequest(adapters=adapters, pin=pin), timeout=self.timeout)
        return list(reply.adapters)

    def unload(self, adapter: str) -> bool:
        return self.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter=adapter), timeout=self.timeout).unloaded

    def loaded(self) -> list[pb.LoadedAdapter]:
        return list(self.stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest(), timeout=self.timeout).adapters)
