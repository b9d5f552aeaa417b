"""Inference SDK: generate (streaming or whole), chat, and the adapter admin calls."""

from __future__ import annotations

import json
from collections.abc import Iterator

from tunedock.client.channel import ServiceClient
from tunedock.errors import TuneDockError
from tunedock.refs import Ref
from tunedock.v1 import inference_pb2 as pb
from tunedock.v1 import inference_pb2_grpc

ROUTING_KEY = "x-tunedock-adapter"
"""Metadata naming the request's adapter, for a proxy in front of several replicas to route on."""


def routing_metadata(adapter: str) -> tuple[tuple[str, str], ...]:
    """The adapter's name as routing metadata (none for the base model).

    The name, not the version or alias: deploy/haproxy hashes on it, so every version of an
    adapter lands on the replica that already serves it, and a promotion finds it warm there.
    """
    if not adapter:
        return ()
    try:
        name = Ref.parse(adapter).name
    except TuneDockError:
        name = adapter  # the server answers what is wrong with it
    return ((ROUTING_KEY, name),)


def chat_message(message: dict) -> pb.ChatMessage:
    """An OpenAI-shaped chat message as the proto's (tool call arguments as JSON text)."""
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function", call)
        arguments = function.get("arguments", "{}")
        calls.append(
            pb.ToolCall(
                id=call.get("id", ""),
                name=function["name"],
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
            )
        )
    return pb.ChatMessage(
        role=message["role"],
        content=message.get("content") or "",
        tool_calls=calls,
        tool_call_id=message.get("tool_call_id", ""),
        name=message.get("name", ""),
    )


class InferenceClient(ServiceClient):
    STUB = inference_pb2_grpc.InferenceServiceStub
    DEFAULT_TIMEOUT = 300.0

    def info(self) -> pb.GetInferenceInfoResponse:
        """What this replica serves: base model and fingerprint, dtype, LoRA limits, isolation (any token may ask)."""
        return self.stub.GetInferenceInfo(pb.GetInferenceInfoRequest(), timeout=self.timeout)

    @staticmethod
    def params(
        prompt: str = "",
        messages: list[dict] | None = None,
        adapter: str = "",
        max_tokens: int = 64,
        temperature: float = 0.0,
        tools: list[dict] | None = None,
        tool_choice: str | dict = "",
        response_format: dict | None = None,
        **sampling,
    ) -> pb.GenerateParams:
        """GenerateParams from OpenAI-shaped pieces: messages (with tool_calls / tool_call_id), tools
        (`{"type": "function", "function": {...}}` or the function alone), tool_choice ("auto", "none",
        "required" or `{"type": "function", "function": {"name": ...}}`), response_format
        (`{"type": "json_schema", "json_schema": {"schema": {...}}}` or `{"type": "json_object"}`)."""
        params = pb.GenerateParams(
            adapter=adapter, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, **sampling)
        )
        if messages:
            params.messages.messages.extend(chat_message(m) for m in messages)
        else:
            params.prompt = prompt
        for tool in tools or ():
            function = tool.get("function", tool)
            params.tools.append(
                pb.Tool(
                    name=function["name"],
                    description=function.get("description", ""),
                    parameters=json.dumps(function["parameters"]) if "parameters" in function else "",
                )
            )
        if isinstance(tool_choice, dict):
            params.tool_choice_function = tool_choice["function"]["name"]
        else:
            params.tool_choice = tool_choice
        if response_format:
            schema = (response_format.get("json_schema") or {}).get("schema")
            params.response_format.type = response_format["type"]
            params.response_format.json_schema = json.dumps(schema) if schema is not None else ""
        return params

    def generate(self, prompt: str = "", adapter: str = "", **kwargs) -> pb.GenerateUnaryResponse:
        """The whole completion (greedy unless temperature > 0)."""
        return self.stub.GenerateUnary(
            pb.GenerateUnaryRequest(params=self.params(prompt, adapter=adapter, **kwargs)),
            timeout=self.timeout,
            metadata=routing_metadata(adapter),
        )

    def stream(self, prompt: str = "", adapter: str = "", **kwargs) -> Iterator[pb.GenerateResponse]:
        """Text deltas as they are generated."""
        yield from self.stub.Generate(
            pb.GenerateRequest(params=self.params(prompt, adapter=adapter, **kwargs)),
            timeout=self.timeout,
            metadata=routing_metadata(adapter),
        )

    def preload(self, adapters: list[str], pin: bool = False) -> list[pb.LoadedAdapter]:
        reply = self.stub.PreloadAdapter(pb.PreloadAdapterRequest(adapters=adapters, pin=pin), timeout=self.timeout)
        return list(reply.adapters)

    def unload(self, adapter: str) -> bool:
        return self.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter=adapter), timeout=self.timeout).unloaded

    def loaded(self) -> list[pb.LoadedAdapter]:
        return list(self.stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest(), timeout=self.timeout).adapters)
