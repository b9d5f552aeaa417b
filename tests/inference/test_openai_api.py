"""The OpenAI-compatible HTTP front, driven by the stock `openai` client against the session's real stack.

The same core serves gRPC and HTTP, so each answer is checked against the gRPC front's answer for
the same request (and logprobs against transformers' own forward pass): the HTTP front adds shapes,
not behaviour.
"""

from __future__ import annotations

import time

import grpc
import httpx
import openai
import pytest
import torch

from tests.inference.test_inference_service import _train_adapter
from tunedock.client import InferenceClient, RegistryClient
from tunedock.v1 import inference_pb2 as pb

pytestmark = pytest.mark.vllm

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the moon."}]


@pytest.fixture(scope="module")
def client(inference_stack):
    with openai.OpenAI(base_url=inference_stack.openai_base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def base_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def adapter(inference_stack, tiny_model_dir, tmp_path_factory):
    path = _train_adapter(tiny_model_dir, tmp_path_factory.mktemp("oai"), seed=7)
    with RegistryClient(inference_stack.registry.address) as registry:
        registry.publish_dir(path, "oai-a")
        registry.set_alias("oai-a", "prod", 1)
    return "oai-a"


@pytest.fixture(scope="module")
def grpc_client(inference_stack):
    with InferenceClient(inference_stack.inference.address) as c:
        yield c


def _grpc_chat(grpc_client, adapter: str = "", max_tokens: int = 12, **sampling) -> pb.Completion:
    return grpc_client.generate(messages=CHAT, adapter=adapter, max_tokens=max_tokens, **sampling).completions[0]


def test_chat_answers_as_the_grpc_front_does_for_base_and_adapter(client, base_id, adapter, grpc_client):
    base = client.chat.completions.create(model=base_id, messages=CHAT, max_tokens=12, temperature=0)
    tuned = client.chat.completions.create(model=f"{adapter}@prod", messages=CHAT, max_tokens=12, temperature=0)
    assert base.choices[0].message.content == _grpc_chat(grpc_client).text
    assert tuned.choices[0].message.content == _grpc_chat(grpc_client, adapter).text
    assert tuned.choices[0].message.content != base.choices[0].message.content
    assert tuned.model == "oai-a:1" and base.model == base_id  # the version that served it
    assert tuned.usage.completion_tokens == 12 and tuned.choices[0].finish_reason == "length"
    prompt_tokens = grpc_client.generate(messages=CHAT, max_tokens=1).prompt_tokens
    assert tuned.usage.prompt_tokens == prompt_tokens > 10 and tuned.usage.total_tokens == prompt_tokens + 12


def test_a_stream_adds_up_to_the_whole_answer_with_usage_last(client, adapter):
    whole = client.chat.completions.create(model=adapter, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=adapter,
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_models_lists_the_base_and_every_adapter_ref_with_lineage(client, base_id, adapter):
    wanted = {base_id, "oai-a", "oai-a:1", "oai-a@prod"}
    deadline = time.monotonic() + 10  # the listing follows the registry's Watch: fresh within moments
    while not wanted <= {m.id for m in client.models.list().data} and time.monotonic() < deadline:
        time.sleep(0.05)
    models = {m.id: m for m in client.models.list().data}
    assert wanted <= set(models)
    card = models["oai-a@prod"].model_dump()
    assert card["parent"] == base_id and card["tunedock"]["version"] == 1 and "prod" in card["tunedock"]["aliases"]
    assert client.models.retrieve("oai-a:1").id == "oai-a:1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


def _hf_logprobs(base, ids: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_echo_with_logprobs_gives_the_prompts_loglikelihood_as_lm_eval_reads_it(client, base_id, tiny_model_dir):
    """What lm-eval's loglikelihood tasks send: echo + logprobs + max_tokens=1, token ids in, sum the prompt's."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("The moon is made of cheese")["input_ids"]
    reply = client.completions.create(model=base_id, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    expected = _hf_logprobs(tiny_model_dir, ids)
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=2e-3)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert chosen in top.values() or chosen <= max(top.values())
    assert reply.choices[0].text.startswith("The moon is made of cheese")
    assert lp.text_offset[1] == len(lp.tokens[0])


def test_chat_logprobs_name_the_greedy_token_as_the_most_likely(client, base_id):
    reply = client.chat.completions.create(
        model=base_id, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob
        assert bytes(token.bytes).decode() == token.token


def test_penalties_and_seeds_reach_the_engine_as_through_grpc(client, base_id, grpc_client):
    asked = dict(presence_penalty=1.5, frequency_penalty=1.0)
    plain = client.chat.completions.create(model=base_id, messages=CHAT, max_tokens=24, temperature=0)
    penalised = client.chat.completions.create(
        model=base_id, messages=CHAT, max_tokens=24, temperature=0, extra_body={"repetition_penalty": 1.8}, **asked
    )
    grpc_text = _grpc_chat(grpc_client, max_tokens=24, repetition_penalty=1.8, **asked).text
    assert penalised.choices[0].message.content == grpc_text != plain.choices[0].message.content
    sampled = [
        client.chat.completions.create(model=base_id, messages=CHAT, max_tokens=8, temperature=1.0, seed=5, n=2)
        for _ in range(2)
    ]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert len(sampled[0].choices) == 2


def test_several_prompts_in_one_completions_request_answer_each_as_alone(client, base_id):
    prompts = ["Once upon a time", "Two plus two is"]
    both = client.completions.create(model=base_id, prompt=prompts, max_tokens=5, temperature=0)
    alone = [client.completions.create(model=base_id, prompt=p, max_tokens=5, temperature=0) for p in prompts]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert both.usage.completion_tokens == 10


def test_a_streamed_completion_adds_up(client, base_id):
    whole = client.completions.create(model=base_id, prompt="Once upon a time", max_tokens=8, temperature=0)
    parts = client.completions.create(
        model=base_id, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text


def test_errors_are_openai_shaped_with_the_grpc_fronts_status(client, base_id, inference_stack):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="ghost-adapter", messages=CHAT, max_tokens=4)
    assert base_id in missing.value.message and "/v1/models" in missing.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=base_id, messages=CHAT, max_tokens=100_000)
    assert "max_tokens must be in 1..4096" in too_many.value.message
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model=base_id, messages=[{"role": "robot", "content": "x"}], max_tokens=4)
    assert "role" in role.value.message
    with pytest.raises(openai.BadRequestError) as tools:  # a named tool choice must name one of the tools
        client.chat.completions.create(
            model=base_id,
            messages=CHAT,
            max_tokens=4,
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    assert "tool_choice" in tools.value.message and "tools" in tools.value.message
    with httpx.Client(base_url=inference_stack.openai_base_url) as raw:
        bad = raw.post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        assert bad.json()["error"]["type"] == "invalid_request_error"
        nowhere = raw.get("/nowhere")
        assert nowhere.status_code == 404 and "/v1/chat/completions" in nowhere.json()["error"]["message"]
        missing_field = raw.post("/chat/completions", json={"model": base_id})
        assert missing_field.status_code == 400 and missing_field.json()["error"]["param"] == "messages"


def test_grpc_clients_get_the_same_new_fields(grpc_client, base_id):
    """Logprobs and prompt logprobs through the gRPC front (one core, two fronts)."""
    reply = grpc_client.generate("Once upon a time", max_tokens=4, logprobs=2, prompt_logprobs=0)
    completion = reply.completions[0]
    assert len(completion.logprobs) == 4 and all(len(lp.top) == 2 for lp in completion.logprobs)
    assert [lp.token_id for lp in completion.logprobs] == list(completion.token_ids)
    assert len(reply.prompt_logprobs) == reply.prompt_tokens - 1
    with pytest.raises(grpc.RpcError) as bad:
        grpc_client.stub.GenerateUnary(
            pb.GenerateUnaryRequest(
                params=pb.GenerateParams(
                    prompt="x", response_format=pb.ResponseFormat(type="json_schema", json_schema="{nope")
                )
            )
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in bad.value.details()


def test_streams_count_against_the_callers_limit_shared_with_grpc(client, base_id, inference_stack):
    """One caller's open streams are counted across both fronts: with the gRPC count at the limit, an
    HTTP stream is refused 429 (openai's RateLimitError); while an HTTP stream is open it counts."""
    from services.common.auth import ANONYMOUS

    auth = inference_stack.inference.server.auth
    ask = {"model": base_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "stream": True}
    auth.streams[ANONYMOUS.name] = auth.max_streams
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**ask)
        assert f"already has {auth.max_streams} open streams" in info.value.message
    finally:
        auth.streams[ANONYMOUS.name] = 0
    stream = client.chat.completions.create(**ask)
    next(iter(stream))
    assert auth.streams[ANONYMOUS.name] == 1  # the open HTTP stream holds one
    list(stream)
    deadline = time.monotonic() + 5
    while auth.streams[ANONYMOUS.name] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert auth.streams[ANONYMOUS.name] == 0


def test_fine_tuning_paths_say_where_they_live_when_nothing_forwards_them(inference_stack):
    with httpx.Client(base_url=inference_stack.openai_base_url) as raw:
        for method, path in (
            ("GET", "/files"),
            ("POST", "/fine_tuning/jobs"),
            ("GET", "/fine_tuning/jobs/job-1/events"),
        ):
            answer = raw.request(method, path)
            assert answer.status_code == 404
            assert (
                "trainer" in answer.json()["error"]["message"]
                and "--fine-tuning-url" in answer.json()["error"]["message"]
            )


def test_a_tool_without_its_function_is_a_bad_request_not_a_crash(inference_stack, base_id):
    # vLLM's own validator reads tools[i]["function"] for a named tool_choice before validating the tools.
    body = {
        "model": base_id,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function"}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    with httpx.Client(base_url=inference_stack.openai_base_url) as raw:
        answer = raw.post("/chat/completions", json=body)
    assert answer.status_code == 400 and "malformed" in answer.json()["error"]["message"]
