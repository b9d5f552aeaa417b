"""Every RPC of every service, driven with messages generated from its descriptors, against real servers.

No call may end INTERNAL or UNKNOWN (every bad input gets a status that says what is
wrong), and each server must still answer its health check afterwards. Examples per RPC:
TUNEDOCK_FUZZ_EXAMPLES (default 25; CI runs 300).

The gate is deterministic: by default every run draws the same examples (hypothesis'
`derandomize`), so a red run means a change broke something, not that the dice rolled
differently. To explore, set TUNEDOCK_FUZZ_SEED=random (a fresh seed, printed in the
header and in every failure) or TUNEDOCK_FUZZ_SEED=<number> to replay one.
"""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.common.fuzz_seed import fuzz_seed
from tests.common.secured import SecuredServices
from tests.trainer.conftest import memorization_jsonl
from tunedock.client import RegistryClient, TrainerClient
from tunedock.v1 import adapter_registry_pb2, inference_pb2, trainer_pb2

EXAMPLES = int(os.environ.get("TUNEDOCK_FUZZ_EXAMPLES", "25"))
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SEEDS: list[str] = ["", "x", "a:1", "a@latest", "a:0", "A", "../etc/passwd", "registry://x@y", "all-linear", "0"]

# ------------------------------------------------------------------------- message strategies

INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalar(field) -> st.SearchStrategy:
    t = field.type
    if t in INT_RANGES:
        low, high = INT_RANGES[t]
        return st.one_of(st.integers(max(low, -3), min(high, 20)), st.integers(low, high))
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_FLOAT:
        return st.floats(width=32)
    if t == F.TYPE_DOUBLE:
        return st.floats()
    if t == F.TYPE_STRING:
        return st.one_of(st.sampled_from(SEEDS), st.text(max_size=40))
    if t == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([memorization_jsonl(2), b'{"text": "hi"}\n', b"[]"]))
    if t == F.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.integers(min(numbers) - 1, max(numbers) + 2)  # unknown values too (open enums)
    raise AssertionError(f"unhandled field type {t}")


def message(descriptor, depth: int = 0) -> st.SearchStrategy:
    """A strategy of messages of `descriptor`: any subset of fields set, nested up to depth 3."""
    strategies = {}
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if field.message_type.GetOptions().map_entry:
                key = scalar(field.message_type.fields_by_name["key"])
                value_field = field.message_type.fields_by_name["value"]
                value = (
                    message(value_field.message_type, depth + 1)
                    if value_field.type == F.TYPE_MESSAGE
                    else scalar(value_field)
                )
                strategies[field.name] = st.dictionaries(key, value, max_size=3)
                continue
            element = message(field.message_type, depth + 1)
        else:
            element = scalar(field)
        is_repeated = field.is_repeated
        strategies[field.name] = st.lists(element, max_size=3) if is_repeated else element
    return st.fixed_dictionaries({}, optional=strategies).map(lambda values: build(descriptor, values))


def build(descriptor, values: dict):
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(descriptor)()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(msg, name)
        if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if hasattr(v, "DESCRIPTOR"):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            if field.type == F.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.type == F.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


# --------------------------------------------------------------------------------- servers


class Fuzzed(SecuredServices):
    """The three services with authentication on; the fuzzer calls as an admin of every project."""

    def address(self, service: str) -> str:
        if service == "TrainerWorkerService":
            return self.trainer.server.address_of("worker")
        return {
            "AdapterRegistryService": self.registry.address,
            "TrainerService": self.trainer.address,
            "TrainerWorkerService": "",
            "InferenceService": self.inference.address,
        }[service]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_model_dir, inference_stack):
    home = tmp_path_factory.mktemp("fuzz")
    users = {"fuzzer": (["all"], ["*"])}
    stack = Fuzzed(home, tiny_model_dir, inference_stack, users, max_tokens_limit=4, max_prompt_chars=400, http_port=0)
    stack.admin_token = stack.user_tokens["fuzzer"]
    # Real ids among the generated strings reach deeper than random ones.
    data = home / "d.jsonl"
    data.write_bytes(memorization_jsonl(4))
    with TrainerClient(stack.trainer.address, token=stack.admin_token) as trainer:
        SEEDS.append(trainer.upload_dataset(data).id)
    SEEDS.extend([str(tiny_model_dir), "fuzz-target", "fuzz-target:1", "fuzz-target@latest"])
    with RegistryClient(stack.registry.address, token=stack.admin_token) as registry:
        registry.publish_dir(tiny_model_dir, "fuzz-target", kind="model")
    yield stack
    stack.stop()


RPCS = [
    (module, service, method)
    for module, services in (
        (adapter_registry_pb2, ["AdapterRegistryService"]),
        (trainer_pb2, ["TrainerService", "TrainerWorkerService"]),
        (inference_pb2, ["InferenceService"]),
    )
    for service in services
    for method in module.DESCRIPTOR.services_by_name[service].methods
]
# Streams that wait for events by design get a short deadline: DEADLINE_EXCEEDED is their normal end here.
LONG_POLLS = {"Watch", "WatchJob"}


@pytest.mark.parametrize(("module", "service", "method"), RPCS, ids=[f"{s}.{m.name}" for _, s, m in RPCS])
def test_rpc_survives_generated_messages(fuzzed, module, service, method):
    channel = grpc.insecure_channel(fuzzed.address(service))
    metadata = (("authorization", f"Bearer {fuzzed.admin_token}"),)
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_class = _class(method.input_type)
    response_class = _class(method.output_type)
    kind = (method.client_streaming, method.server_streaming)
    factory = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
    }[kind]
    call = factory(
        path, request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString
    )
    timeout = 0.1 if method.name in LONG_POLLS else 20
    seen: dict[str, int] = {}

    chosen_seed = fuzz_seed()
    replay = f" (replay: TUNEDOCK_FUZZ_SEED={chosen_seed})" if chosen_seed is not None else ""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=chosen_seed is None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(st.lists(message(method.input_type), min_size=0 if method.client_streaming else 1, max_size=3))
    def drive(requests):
        try:
            if method.client_streaming:
                call(iter(requests), metadata=metadata, timeout=timeout)
            elif method.server_streaming:
                for i, _ in enumerate(call(requests[0], metadata=metadata, timeout=timeout)):
                    if i >= 4:
                        break
            else:
                call(requests[0], metadata=metadata, timeout=timeout)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code not in FORBIDDEN, f"{path} answered {code.name}: {exc.details()} for {requests!r}{replay}"
        seen[code.name] = seen.get(code.name, 0) + 1

    if chosen_seed is not None:
        drive = seed(chosen_seed)(drive)
    try:
        drive()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert sum(seen.values()) >= 1  # (messages without fields have few distinct examples)
    finally:
        channel.close()


def _class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


# ------------------------------------------------------------------------- the HTTP front

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}


def _openai_fields(model_ids: list[str]) -> dict:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "robot"]) | JSON},
        optional={
            "content": st.text(max_size=30) | JSON,
            "tool_calls": st.just(
                [{"id": "c", "type": "function", "function": WEATHER["function"] | {"arguments": "{}"}}]
            )
            | JSON,
            "tool_call_id": st.text(max_size=8) | JSON,
        },
    )
    return {
        "model": st.sampled_from(model_ids) | JSON,
        "messages": st.lists(message, max_size=3) | JSON,
        "prompt": st.text(max_size=30) | st.lists(st.integers(-2, 3000), max_size=6) | JSON,
        "max_tokens": st.integers(-2, 6) | JSON,
        "max_completion_tokens": st.integers(-2, 6) | JSON,
        "temperature": st.floats(-1, 3) | JSON,
        "top_p": st.floats(-0.5, 1.5) | JSON,
        "n": st.integers(-1, 3) | JSON,
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=2) | JSON,
        "seed": st.integers(-(2**64), 2**64) | JSON,
        "logprobs": st.booleans() | st.integers(-1, 25) | JSON,
        "top_logprobs": st.integers(-1, 25) | JSON,
        "echo": st.booleans() | JSON,
        "presence_penalty": st.floats(-3, 3) | JSON,
        "repetition_penalty": st.floats(-1, 3) | JSON,
        "tools": st.just([WEATHER]) | st.lists(JSON, max_size=2) | JSON,
        "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "x"}}])
        | JSON,
        "response_format": st.sampled_from(
            [
                {"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
                {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nonsense"}}},
            ]
        )
        | JSON,
        "stream": st.booleans(),
        "stream_options": st.just({"include_usage": True}) | JSON,
    }


@pytest.mark.parametrize("path", ["/chat/completions", "/completions", "/models/{}"])
def test_the_openai_front_survives_generated_bodies(fuzzed, path, tiny_model_dir):
    """No body gets a 500 or breaks the reply's shape; every refusal is OpenAI's error object."""
    import json
    from urllib.parse import quote

    import httpx

    url = f"http://127.0.0.1:{fuzzed.inference.server.http_port}/v1"
    headers = {"Authorization": f"Bearer {fuzzed.admin_token}"}
    model_ids = [tiny_model_dir.name, "fuzz-target", "ghost", "", "a:0", "x@prod"]
    chosen_seed = fuzz_seed()
    replay = f" (replay: TUNEDOCK_FUZZ_SEED={chosen_seed})" if chosen_seed is not None else ""
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=chosen_seed is None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(
        st.fixed_dictionaries({}, optional=_openai_fields(model_ids)), st.sampled_from(model_ids) | st.text(max_size=12)
    )
    def drive(body, model_id):
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            get = path.startswith("/models")
            reply = client.get(f"/models/{quote(model_id, safe='')}") if get else client.post(path, json=body)
        seen[reply.status_code] = seen.get(reply.status_code, 0) + 1
        assert reply.status_code < 500 or reply.status_code == 503, f"{path} {reply.status_code}: {reply.text}{replay}"
        if reply.status_code >= 400:
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], reply.text
        elif reply.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", reply.text
            for event in events[:-1]:
                payload = json.loads(event)
                assert "error" not in payload or payload["error"]["message"], event
        else:
            assert "object" in reply.json()

    if chosen_seed is not None:
        drive = seed(chosen_seed)(drive)
    drive()
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:  # still serving, and generating
        reply = client.post(
            "/completions", json={"model": tiny_model_dir.name, "prompt": "hi", "max_tokens": 2, "temperature": 0}
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    assert sum(seen.values()) >= 1
