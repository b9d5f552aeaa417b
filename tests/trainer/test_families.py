"""Every model family users bring, each as a tiny random-init model built from its transformers config class.

Per family (Llama with a Llama-3 template, Qwen2, Mistral, Gemma2, Gemma3 text and the multimodal class,
Phi3): chat masking on the family's own template shape, packed loss equal to unpacked loss with examples
longer than the sliding window, the four methods training and publishing, and LoRA/QLoRA adapters served
by the real inference service with HF+PEFT's greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.trainer.config import TrainConfig
from services.trainer.data.records import Example, Message, parse_dataset
from services.trainer.validation import check_against_base, freeze_selection
from services.trainer.worker.training.batches import BatchPlan
from services.trainer.worker.training.distributed import Dist
from services.trainer.worker.training.events import Log, Progress
from services.trainer.worker.training.formatting import IGNORE, ChatFormatter, FormattingError
from services.trainer.worker.training.loss import CausalLMLoss
from services.trainer.worker.training.recipe import RunContext, tokenize_examples, train
from tests.conftest import MODEL_CACHE
from tests.trainer.conftest import memorization_jsonl
from tunedock.errors import InvalidArgument
from tunedock.model_files import inspect_base
from tunedock.tiny_model import FAMILY_MATRIX, TinyModelSpec, build_tiny_model

METHODS = ("full", "freeze", "lora", "qlora")
# What the loss covers in a two-turn chat, per family: each answer and the token that ends its turn.
LEARNED = {
    "llama": ["Hello!<|im_end|>", "No.<|im_end|>"],
    "llama3": ["Hello!<|eot_id|>", "No.<|eot_id|>"],
    "qwen2": ["Hello!<|im_end|>", "No.<|im_end|>"],
    "mistral": ["Hello!</s>", "No.</s>"],
    "gemma2": ["Hello!<end_of_turn>", "No.<end_of_turn>"],
    "gemma3": ["Hello!<end_of_turn>", "No.<end_of_turn>"],
    "gemma3-mm": ["Hello!<end_of_turn>", "No.<end_of_turn>"],
    # Phi-3.5 closes a conversation with EOS; a middle turn's EOS is replaced by the next <|user|>.
    "phi3": ["Hello!<|end|>", "No.<|end|>\n<|endoftext|>"],
}


def family_dir(family: str) -> Path:
    return build_tiny_model(TinyModelSpec(family=family), cache_dir=MODEL_CACHE)


def _tokenizer(family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family_dir(family))


def _learned_spans(tokenizer, tokenized) -> list[str]:
    spans, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current).strip())
            current = []
    if current:
        spans.append(tokenizer.decode(current).strip())
    return spans


# ------------------------------------------------------------------------------ chat formatting


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("family", ["llama", *FAMILY_MATRIX])
def test_chat_masking_on_each_familys_template(family, system):
    """The loss covers each assistant turn and its end-of-turn token, whatever the template does with the rest
    (Mistral moves the system prompt into the last user turn, Gemma2 refuses a system role)."""
    tokenizer = _tokenizer(family)
    turns = [Message("user", "Hi there"), Message("assistant", "Hello!"), Message("user", "More?")]
    turns.append(Message("assistant", "No."))
    if system:
        turns.insert(0, Message("system", "Be brief."))
    notices = []
    tokenized = ChatFormatter(tokenizer, notices.append)(Example(messages=tuple(turns), where="line 1"), 512)
    assert _learned_spans(tokenizer, tokenized) == LEARNED[family]
    if family == "gemma2" and system:
        assert notices == [
            "the chat template has no system role: system prompts are put at the head of the first user turn"
        ]
        assert "Be brief." in tokenizer.decode(tokenized.input_ids)  # kept, at the head of the first user turn


def test_weight_zero_turns_are_not_learned():
    tokenizer = _tokenizer("qwen2")
    turns = (
        Message("user", "a"),
        Message("assistant", "skip me", learn=False),
        Message("user", "b"),
        Message("assistant", "learn me"),
    )
    tokenized = ChatFormatter(tokenizer)(Example(messages=turns), 512)
    assert _learned_spans(tokenizer, tokenized) == ["learn me<|im_end|>"]


def test_tool_calls_train_through_the_templates_tool_support():
    """LLaMA-Factory tool-calling data: the call is learned as the template renders it; the tool's result is not."""
    tools = [{"name": "weather", "description": "Weather in a city", "parameters": {"type": "object"}}]
    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
            {"from": "observation", "value": '{"temp": -3}'},
            {"from": "gpt", "value": "It is -3 degrees."},
        ],
        "tools": json.dumps(tools),
    }
    example = parse_dataset(json.dumps(record).encode()).examples[0]
    tokenizer = _tokenizer("qwen2")
    tokenized = ChatFormatter(tokenizer)(example, 1024)
    text = tokenizer.decode(tokenized.input_ids)
    assert "# Tools" in text and '"name": "weather"' in text  # the tools are in the prompt
    assert _learned_spans(tokenizer, tokenized) == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "It is -3 degrees.<|im_end|>",
    ]
    # A template without tool support would train calls to nothing: refused, naming the problem.
    with pytest.raises(FormattingError, match="does not render tools or tool calls"):
        ChatFormatter(_tokenizer("llama3"))(example, 1024)


# ---------------------------------------------------------------------------- validation


def test_tied_lm_head_cannot_train_alone_in_freeze():
    info = inspect_base(family_dir("qwen2"))
    assert info.tied_embeddings
    cfg = TrainConfig(base_model="x", method="freeze", dataset_ids=["d"], trainable_layers=1, extra_modules=["lm_head"])
    with pytest.raises(InvalidArgument, match=r"lm_head is tied to embed_tokens.*extra_modules=\['embed_tokens'\]"):
        check_against_base(cfg, info)
    check_against_base(
        TrainConfig(base_model="x", method="freeze", dataset_ids=["d"], extra_modules=["embed_tokens"]), info
    )


def test_multimodal_checkpoints_are_judged_by_their_language_model():
    info = inspect_base(family_dir("gemma3-mm"))
    # The checkpoint names its language model as the hub's Gemma3 checkpoints do.
    assert info.num_layers == 2 and info.layer_prefix == "language_model.model.layers."
    assert info.linear_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    cfg = TrainConfig(base_model="x", method="freeze", dataset_ids=["d"], trainable_layers=1, extra_modules=["norm"])
    chosen = freeze_selection(list(info.params), info.num_layers, cfg)
    assert chosen and all("vision" not in n for n in chosen)
    assert "language_model.model.norm.weight" in chosen
    assert any(n.startswith("language_model.model.layers.1.") for n in chosen)


# -------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("family", FAMILY_MATRIX)
def test_packed_loss_equals_unpacked_loss(family, tmp_path):
    """Examples longer than the sliding window (16 tokens): packing must keep windows and soft-capping."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer.worker.training.model import attention_for

    base = family_dir(family)
    attention, _ = attention_for(AutoConfig.from_pretrained(base), "cpu")
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation=attention).eval()
    tokenizer = _tokenizer(family)
    examples = parse_dataset(memorization_jsonl(6)).examples
    store, _ = tokenize_examples(examples, tokenizer, 512, tmp_path, lambda message: None)
    assert min(store.length(i) for i in range(len(store))) > 16  # every example crosses the window
    pad = tokenizer.pad_token_id
    unpacked = BatchPlan.build(store, 8, 512, packing=False, pad_id=pad).batch(0)
    packed = BatchPlan.build(store, 8, 512, packing=True, pad_id=pad).batch(0)
    module = CausalLMLoss(model)
    with torch.no_grad():
        torch.testing.assert_close(
            module(**packed.model_inputs()), module(**unpacked.model_inputs()), rtol=1e-5, atol=1e-3
        )


# -------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from services.adapter_registry.server import build_server
    from services.adapter_registry.settings import RegistrySettings
    from services.common.server_thread import ServerThread

    data = tmp_path_factory.mktemp("family-registry")
    server = ServerThread(lambda: build_server(RegistrySettings(port=0, metrics_port=-1, data_dir=data)))
    yield server
    server.stop()


TRAINED: dict[tuple[str, str], tuple[Path, dict]] = {}


def _train(family: str, method: str, out: Path):
    """One in-process run on the family's base, packed, as a job would run it."""
    base = family_dir(family)
    examples = parse_dataset(memorization_jsonl()).examples
    cfg = TrainConfig(
        base_model=str(base),
        method=method,
        dataset_ids=["d"],
        max_steps=16,
        batch_size=4,
        learning_rate=5e-3 if method in ("lora", "qlora") else 1e-3,
        log_every_steps=4,
        packing=True,
        lora_r=8,
        trainable_layers=1,
    )
    events = []
    result = train(cfg, examples, examples[:2], RunContext(out / "ckpt", out / "out", events.append, dist=Dist()))
    return result, events


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_MATRIX)
def test_the_four_methods_train_and_publish(family, registry, tmp_path_factory):
    from tunedock.client import RegistryClient

    with RegistryClient(registry.address, timeout=60) as client:
        for method in METHODS:
            out = tmp_path_factory.mktemp(f"{family}-{method}")
            result, events = _train(family, method, out)
            losses = [e.loss for e in events if isinstance(e, Progress)]
            assert losses[-1] < 0.8 * losses[0], (method, losses)
            logs = " | ".join(e.message for e in events if isinstance(e, Log))
            assert ("attention: eager" in logs) == (family == "gemma2"), logs  # soft-capping needs eager
            if family == "gemma3-mm":  # the language model trains; the vision tower never does
                trained = [n for n, p in result.model.named_parameters() if p.requires_grad]
                assert trained and not [n for n in trained if "vision" in n or "projector" in n]
            published = client.publish_dir(result.output_dir, f"{family}-{method}", kind=result.kind)
            assert not published.deduplicated and published.version.version == 1
            TRAINED[(family, method)] = (result.output_dir, result.metrics)


# --------------------------------------------------------------------------------- serving


def _peft_greedy(base: Path, adapter: Path, prompt: str, max_tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from services.trainer.worker.training.model import attention_for

    attention, _ = attention_for(AutoConfig.from_pretrained(base), "cpu")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=attention)
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids = AutoTokenizer.from_pretrained(base)(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return out[0][ids["input_ids"].shape[1] :].tolist()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_MATRIX)
def test_lora_and_qlora_adapters_serve_with_peft_greedy_tokens(family, tmp_path_factory):
    """The trained adapters, published and served by the real inference service on the family's base."""
    if family == "gemma3-mm":
        pytest.skip(
            "vLLM's Gemma3ForConditionalGeneration imports transformers' Gemma3 image processor, which needs "
            "torchvision; PyPI's torchvision cannot be installed beside CPU torch on this machine"
        )
    from tests.conftest import InferenceStack
    from tunedock.client import InferenceClient, RegistryClient

    base = family_dir(family)
    tokenizer = _tokenizer(family)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does the pirate say about ship 3?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    adapters = {}
    for method in ("lora", "qlora"):
        if (family, method) not in TRAINED:  # run alone: train here
            out = tmp_path_factory.mktemp(f"serve-{family}-{method}")
            TRAINED[(family, method)] = (_train(family, method, out)[0].output_dir, {})
        adapters[method] = TRAINED[(family, method)][0]
    stack = InferenceStack(tmp_path_factory.mktemp(f"serve-{family}"), base, max_loras=2)
    try:
        with RegistryClient(stack.registry.address) as registry, InferenceClient(stack.inference.address) as client:
            base_tokens = list(client.generate(prompt, max_tokens=12).completions[0].token_ids)
            for method, adapter in adapters.items():
                registry.publish_dir(adapter, f"{family}-{method}")
                served = list(
                    client.generate(prompt, adapter=f"{family}-{method}", max_tokens=12).completions[0].token_ids
                )
                assert served == _peft_greedy(base, adapter, prompt, 12), method
                assert served != base_tokens, method  # the adapter changes what the model says
                assert tokenizer.decode(served).strip().startswith("Arr"), tokenizer.decode(served)
    finally:
        stack.stop()
