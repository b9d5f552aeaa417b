"""The tiny model: deterministic, cached, and loadable by transformers, peft and vLLM (with a LoRA)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tunedock.tiny_model import IM_END, TinyModelSpec, build_tiny_model, tiny_model_path

PROMPT = "The capital of France"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_size(tiny_model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).is_file(), name
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "llama" and config.num_hidden_layers == 2
    assert config.hidden_size // config.num_attention_heads == 64


def test_build_is_deterministic_and_cached(tmp_path, tiny_model_dir):
    again = build_tiny_model(cache_dir=tmp_path)
    assert _sha(again / "model.safetensors") == _sha(tiny_model_dir / "model.safetensors")
    assert _sha(again / "tokenizer.json") == _sha(tiny_model_dir / "tokenizer.json")
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(cache_dir=tmp_path) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    other = build_tiny_model(TinyModelSpec(seed=1), cache_dir=tmp_path)
    assert other != again and _sha(other / "model.safetensors") != _sha(again / "model.safetensors")
    assert not list(tmp_path.glob(".build-*"))  # no staging directories left behind


def test_spec_validation():
    with pytest.raises(ValueError, match="multiple of 64"):
        TinyModelSpec(hidden_size=100)
    assert tiny_model_path(TinyModelSpec(seed=3)).name.startswith("tiny-llama-s3-")


def test_loads_in_transformers_with_chat_template(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n_params <= 5_000_000
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    masked = [t for t, m in zip(chat["input_ids"], chat["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "hello" + IM_END
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids.input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


# The default template before it rendered tools: conversations without tools must render as they did.
CHATML_WITHOUT_TOOLS = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_the_default_template_renders_tools_and_nothing_else_changed(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": " Hello! "},
            {"role": "user", "content": "more"},
        ],
    ]
    for chat in conversations:
        for generation_prompt in (True, False):
            kwargs = dict(tokenize=False, add_generation_prompt=generation_prompt)
            assert tokenizer.apply_chat_template(chat, **kwargs) == tokenizer.apply_chat_template(
                chat, chat_template=CHATML_WITHOUT_TOOLS, **kwargs
            )
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    chat = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "cloudy"},
    ]
    text = tokenizer.apply_chat_template(chat, tools=[tool], tokenize=False)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>' in text
    assert "<tool_response>\ncloudy\n</tool_response>" in text
    out = tokenizer.apply_chat_template(chat[:2], tools=[tool], return_dict=True, return_assistant_tokens_mask=True)
    learned = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(learned).startswith("<tool_call>")  # the call is what the model learns to say


def _peft_adapter(tiny_model_dir, out_dir):
    """A LoRA adapter with random (non-zero) B, so it visibly changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt")
    base_out = base.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids.input_ids.shape[1] :].tolist()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out_dir)
    lora_out = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids.input_ids.shape[1] :].tolist()
    return base_out, lora_out


def test_loads_in_peft_and_vllm_with_lora_request(tiny_model_dir, inference_stack, tmp_path):
    from vllm.lora.request import LoRARequest

    base_out, lora_out = _peft_adapter(tiny_model_dir, tmp_path / "adapter")
    assert base_out != lora_out
    # The session's vLLM CPU engine, called directly: no adapter, then peft's adapter via a LoRARequest.
    assert inference_stack.engine_tokens(PROMPT) == base_out
    assert inference_stack.engine_tokens(PROMPT, LoRARequest("t", 1, str(tmp_path / "adapter"))) == lora_out
