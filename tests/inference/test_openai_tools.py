"""What training taught, asked for at serving time: a tool-calling adapter given its tools, JSON by schema.

One LoRA adapter is trained here (the real recipe, in process) on an OpenAI-format dataset with
tools, tool calls and tool results, plus answers in JSON, on the session's default model (its
ChatML template renders tools as Qwen2.5's does). It is published and served by the session's
engine, then driven by the stock `openai` client, LangChain's ChatOpenAI and the gRPC SDK.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

from services.common.chat import ChatRenderer, openai_message
from services.trainer.config import TrainConfig
from services.trainer.data.records import parse_dataset
from services.trainer.worker.training.distributed import Dist
from services.trainer.worker.training.formatting import IGNORE, ChatFormatter
from services.trainer.worker.training.recipe import RunContext, train
from tunedock.client import InferenceClient, RegistryClient

pytestmark = pytest.mark.vllm

CITIES = {
    "Paris": ("France", "sunny"),
    "Rome": ("Italy", "cloudy"),
    "Oslo": ("Norway", "snowing"),
    "Lima": ("Peru", "windy"),
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


def _call(i: int, city: str) -> dict:
    arguments = json.dumps({"city": city})
    return {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def tool_records() -> list[dict]:
    records = []
    for i, (city, (country, weather)) in enumerate(CITIES.items()):
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is the weather in {city}?"},
                    {"role": "assistant", "content": "", "tool_calls": [_call(i, city)]},
                    {"role": "tool", "tool_call_id": f"call_{i}", "content": weather},
                    {"role": "assistant", "content": f"It is {weather} in {city}."},
                ],
                "tools": [WEATHER],
            }
        )
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"Describe {city} as JSON."},
                    {"role": "assistant", "content": json.dumps({"city": city, "country": country})},
                ]
            }
        )
    return records


@pytest.fixture(scope="module")
def tool_adapter(inference_stack, tiny_model_dir, tmp_path_factory):
    """The adapter, trained to loss ~0.001 (the tiny model memorises the calls) and published as tool-pilot.

    Every step sees all eight records (batch_size 8): in smaller batches, drawn afresh each epoch,
    the tiny model can settle with two cities' calls confused (Rome answered as Paris) at a mean
    loss that hides one wrong token."""
    out = tmp_path_factory.mktemp("tool-pilot")
    examples = parse_dataset("\n".join(json.dumps(r) for r in tool_records()).encode()).examples
    cfg = TrainConfig(
        base_model=str(tiny_model_dir),
        method="lora",
        dataset_ids=["tools"],
        max_steps=120,
        batch_size=8,
        learning_rate=3e-3,
        lora_r=64,
        lora_alpha=64,
        log_every_steps=20,
    )
    result = train(cfg, examples, examples[:2], RunContext(out / "ckpt", out / "out", lambda e: None, dist=Dist()))
    with RegistryClient(inference_stack.registry.address) as registry:
        registry.publish_dir(result.output_dir, "tool-pilot")
    return result.output_dir


@pytest.fixture(scope="module")
def client(inference_stack):
    with openai.OpenAI(base_url=inference_stack.openai_base_url, api_key="unused", max_retries=0) as c:
        yield c


def test_serving_renders_a_conversation_to_the_tokens_training_learned(inference_stack, tiny_model_dir):
    """One renderer: the prompt the engine gets is token for token the training sequence up to the answer."""
    from transformers import AutoTokenizer

    formatter = ChatFormatter(AutoTokenizer.from_pretrained(tiny_model_dir))  # as the worker loads it
    served = inference_stack.engine.chat  # the engine's own tokenizer (vLLM's)
    for record in tool_records():
        trained = formatter(parse_dataset(json.dumps(record).encode()).examples[0], 4096)
        last = max(i for i, m in enumerate(record["messages"]) if m["role"] != "assistant")
        messages = [openai_message(m, i) for i, m in enumerate(record["messages"][: last + 1])]
        prompt = served.encode(served.prompt(messages, record.get("tools")))
        assert trained.input_ids[: len(prompt)] == prompt
        assert trained.labels[len(prompt) - 1] == IGNORE and trained.labels[len(prompt)] != IGNORE  # the answer


def _peft_greedy(base, adapter, messages, tools, max_tokens: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    renderer = ChatRenderer(tokenizer)
    ids = renderer.encode(renderer.prompt([openai_message(m, i) for i, m in enumerate(messages)], tools))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True)


def test_a_tool_call_comes_back_parsed_and_the_tool_result_is_answered(
    client, tool_adapter, tiny_model_dir, inference_stack
):
    ask = [{"role": "user", "content": "What is the weather in Rome?"}]
    first = client.chat.completions.create(
        model="tool-pilot", messages=ask, tools=[WEATHER], max_tokens=96, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    assert call.id and not choice.message.content
    follow = [
        *ask,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "cloudy"},
    ]
    second = client.chat.completions.create(
        model="tool-pilot", messages=follow, tools=[WEATHER], max_tokens=24, temperature=0
    )
    answer = second.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    # Token for token what transformers + PEFT say on the same rendering: the HTTP front added nothing.
    assert answer.message.content == _peft_greedy(tiny_model_dir, tool_adapter, follow, [WEATHER], 24)


def test_a_streamed_tool_call_adds_up_to_the_same_call(client, tool_adapter):
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    chunks = list(
        client.chat.completions.create(
            model="tool-pilot", messages=ask, tools=[WEATHER], max_tokens=96, temperature=0, stream=True
        )
    )
    names, arguments, ids = "", "", set()
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            names += delta.function.name or ""
            arguments += delta.function.arguments or ""
            ids.update([delta.id] if delta.id else [])
    assert names == "get_weather" and json.loads(arguments) == {"city": "Oslo"} and len(ids) == 1
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()  # the markup is not content


def test_a_named_tool_choice_constrains_decoding_to_the_functions_arguments(client, tool_adapter):
    reply = client.chat.completions.create(
        model="tool-pilot",
        messages=[{"role": "user", "content": "What is the weather in Lima?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=96,
        temperature=0,
    )
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) <= {"city"}  # the schema's object, whatever the model chose


def test_json_schema_output_is_valid_json_of_the_schema(client, tool_adapter):
    reply = client.chat.completions.create(
        model="tool-pilot",
        messages=[{"role": "user", "content": "Describe Oslo as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
        max_tokens=96,
        temperature=0,
    )
    assert json.loads(reply.choices[0].message.content) == {"city": "Oslo", "country": "Norway"}
    parsed = client.chat.completions.parse(
        model="tool-pilot",
        messages=[{"role": "user", "content": "Describe Lima as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
        max_tokens=96,
        temperature=0,
    )
    assert json.loads(parsed.choices[0].message.content) == {"city": "Lima", "country": "Peru"}


def test_grpc_clients_give_tools_and_get_calls_back(inference_stack, tool_adapter):
    with InferenceClient(inference_stack.inference.address) as grpc_client:
        reply = grpc_client.generate(
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            adapter="tool-pilot",
            tools=[WEATHER],
            max_tokens=96,
        )
    completion = reply.completions[0]
    assert completion.finish_reason == 4  # FINISH_REASON_TOOL_CALLS
    (call,) = completion.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_langchain_chat_openai_invokes_streams_binds_tools_and_structures_output(inference_stack, tool_adapter):
    from langchain_core.messages import AIMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=inference_stack.openai_base_url, api_key="unused", model="tool-pilot", temperature=0, max_tokens=96
    )
    answer = llm.invoke("Describe Paris as JSON.")
    assert isinstance(answer, AIMessage) and json.loads(answer.content) == {"city": "Paris", "country": "France"}
    assert "".join(chunk.content for chunk in llm.stream("Describe Paris as JSON.")) == answer.content
    called = llm.bind_tools([WEATHER]).invoke("What is the weather in Rome?")
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [("get_weather", {"city": "Rome"})]
    structured = llm.with_structured_output(CITY_SCHEMA | {"title": "City"}, method="json_schema")
    assert structured.invoke("Describe Rome as JSON.") == {"city": "Rome", "country": "Italy"}


def _lm_eval_task(tmp_path, kind: str) -> str:
    """A local lm-evaluation-harness task (YAML + JSONL, no hub): the adapter's JSON answers."""
    rows = []
    countries = [country for country, _ in CITIES.values()]
    for city, (country, _) in CITIES.items():
        answers = [json.dumps({"city": city, "country": c}) for c in countries]
        rows.append({"question": f"Describe {city} as JSON.", "choices": answers, "label": countries.index(country)})
    data = tmp_path / f"{kind}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    common = [
        f"task: tunedock_{kind}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data}",
        "test_split: test",
    ]
    if kind == "choice":  # loglikelihood: echo + logprobs on /v1/completions
        body = [
            "output_type: multiple_choice",
            'doc_to_text: "{{question}}"',
            'doc_to_choice: "{{choices}}"',
            "doc_to_target: label",
            "metric_list:",
            "  - metric: acc",
        ]
    else:  # generation on /v1/chat/completions
        body = [
            "output_type: generate_until",
            'doc_to_text: "{{question}}"',
            'doc_to_target: "{{choices[label]}}"',
            "generation_kwargs:",
            "  until: []",
            "  max_gen_toks: 32",
            "metric_list:",
            "  - metric: exact_match",
        ]
    (tmp_path / f"{kind}.yaml").write_text("\n".join(common + body) + "\n")
    return f"tunedock_{kind}"


def test_lm_eval_scores_the_adapter_over_the_openai_api(inference_stack, tool_adapter, tiny_model_dir, tmp_path):
    """lm-evaluation-harness as users run it: local-completions (loglikelihood through echo + logprobs, token
    ids in) and local-chat-completions (generation), against the base and the adapter."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    choice, generate = _lm_eval_task(tmp_path, "choice"), _lm_eval_task(tmp_path, "generate")
    tasks = TaskManager(include_path=str(tmp_path))
    base_id = json.loads(_get(f"{inference_stack.openai_base_url}/models"))["data"][0]["id"]
    scores = {}
    for model in (base_id, "tool-pilot"):
        common = {"model": model, "tokenizer": str(tiny_model_dir), "tokenizer_backend": "huggingface"}
        loglikelihood = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={**common, "base_url": f"{inference_stack.openai_base_url}/completions", "max_retries": 1},
            tasks=[choice],
            task_manager=tasks,
        )
        generation = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args={**common, "base_url": f"{inference_stack.openai_base_url}/chat/completions", "max_retries": 1},
            tasks=[generate],
            task_manager=tasks,
            apply_chat_template=True,
        )
        scores[model] = (
            loglikelihood["results"][choice]["acc,none"],
            generation["results"][generate]["exact_match,none"],
        )
    # Generation goes through the chat template the adapter was trained on: it writes every answer. The
    # loglikelihood task scores raw "question answer" text (no template), where it still ranks better.
    assert scores["tool-pilot"][1] == 1.0 and scores[base_id][1] == 0.0, scores
    assert scores["tool-pilot"][0] > scores[base_id][0], scores


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read().decode()


def test_the_cli_sends_a_system_prompt_and_tools(inference_stack, tool_adapter, tmp_path):
    import os

    from tests.test_cli import tunedock

    env = {**os.environ, "TUNEDOCK_INFERENCE_ADDRESS": inference_stack.inference.address}
    env.pop("LD_PRELOAD", None)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    called = tunedock(
        env,
        "generate",
        "--adapter",
        "tool-pilot",
        "--tools",
        str(tools),
        "--max-tokens",
        "96",
        "What is the weather in Rome?",
    )
    assert called.returncode == 0, called.stderr
    assert '[tool call] get_weather({"city": "Rome"})' in called.stdout
    system = "You are terse."
    told = tunedock(env, "generate", "--system", system, "--max-tokens", "8", "--json", "Tell me about the moon.")
    assert told.returncode == 0, told.stderr
    with InferenceClient(inference_stack.inference.address) as grpc_client:
        expected = grpc_client.generate(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "Tell me about the moon."}],
            max_tokens=8,
        )
    assert json.loads(told.stdout)["completions"][0]["text"] == expected.completions[0].text
    refused = tunedock(env, "generate", "--raw", "--system", system, "hi")
    assert refused.returncode != 0 and "drop --raw" in refused.stderr
