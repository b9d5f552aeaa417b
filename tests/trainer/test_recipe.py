"""The training flow, in process, on the tiny model with real transformers/peft/bitsandbytes."""

from __future__ import annotations

import pytest
import torch

from services.trainer.config import TrainConfig
from services.trainer.training.recipe import RunContext, expand_delta, load_model, make_batches, train


def _run(tiny_model_dir, examples, tmp_path, method, **overrides):
    events = []
    cfg = TrainConfig(
        base_model=str(tiny_model_dir),
        method=method,
        dataset_ids=["ds"],
        max_steps=24,
        batch_size=4,
        learning_rate=3e-3 if method in ("lora", "qlora") else 1e-3,
        log_every_steps=4,
        **overrides,
    )
    ctx = RunContext(
        tmp_path / "ckpt", tmp_path / "out", report=lambda kind, fields: events.append((kind, fields)), device="cpu"
    )
    result = train(cfg, examples, examples[:2], ctx)
    losses = [f["loss"] for kind, f in events if kind == "progress"]
    return cfg, result, losses, events


def _base_state(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}


def _logits(model, tokenizer, text="What does the pirate say about ship 3?"):
    ids = tokenizer(text, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**ids).logits.float()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_full_trains_every_weight(tiny_model_dir, memorization_examples, tmp_path):
    _, result, losses, events = _run(tiny_model_dir, memorization_examples, tmp_path, "full")
    assert losses[-1] < 0.5 * losses[0]
    assert result.kind == "model" and (result.output_dir / "model.safetensors").exists()
    assert result.metrics["trainable_params"] == result.metrics["total_params"]
    progress = [f for k, f in events if k == "progress"]
    assert all(f["tokens_per_second"] > 0 and f["peak_memory_bytes"] > 0 and f["grad_norm"] > 0 for f in progress)
    assert progress[-1]["step"] == progress[-1]["total_steps"] == 24
    assert any(k == "eval" for k, _ in events)


def test_freeze_changes_only_the_chosen_tensors(tiny_model_dir, memorization_examples, tmp_path):
    before = _base_state(tiny_model_dir)
    _, result, losses, _ = _run(
        tiny_model_dir,
        memorization_examples,
        tmp_path,
        "freeze",
        trainable_layers=1,
        trainable_modules=["mlp"],
        extra_modules=["lm_head"],
        publish_expanded=True,
    )
    assert losses[-1] < losses[0]
    after = result.model.state_dict()
    chosen = {n for n in before if (".layers.1.mlp." in n) or n.startswith("lm_head")}
    assert chosen and len(chosen) == 4
    for name, tensor in before.items():
        if name in chosen:
            assert not torch.equal(tensor, after[name]), f"{name} should have trained"
        else:
            assert torch.equal(tensor, after[name]), f"{name} is frozen but changed"
    assert result.kind == "delta"
    # The delta holds exactly the chosen tensors; expanded over the base it equals the trained model.
    from safetensors.torch import load_file

    assert set(load_file(str(result.output_dir / "delta.safetensors"))) == chosen
    expanded = expand_delta(result.output_dir, str(tiny_model_dir), tmp_path / "expanded")
    from transformers import AutoModelForCausalLM

    rebuilt = AutoModelForCausalLM.from_pretrained(expanded).state_dict()
    assert all(torch.equal(rebuilt[n], after[n]) for n in after)
    # publish_expanded: the trainer also wrote the full model, equal to the trained one.
    published_full = AutoModelForCausalLM.from_pretrained(result.expanded_dir).state_dict()
    assert all(torch.equal(published_full[n], after[n]) for n in after)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_leave_the_base_untouched_and_reload_with_peft(
    tiny_model_dir, memorization_examples, tmp_path, tokenizer, method
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result, losses, _ = _run(
        tiny_model_dir,
        memorization_examples,
        tmp_path,
        method,
        lora_r=4,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    assert losses[-1] < 0.7 * losses[0]
    assert result.kind == "lora_adapter"
    assert result.metrics["trainable_params"] < 0.1 * result.metrics["total_params"]
    trained = result.model
    in_trainer = _logits(trained, tokenizer)
    if method == "lora":
        before = _base_state(tiny_model_dir)
        base_now = {
            k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in trained.state_dict().items()
            if "lora_" not in k
        }
        assert set(base_now) == set(before)
        assert all(torch.equal(before[k], base_now[k]) for k in before)
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    else:
        import bitsandbytes as bnb
        from transformers import BitsAndBytesConfig

        quantized = [m for m in trained.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(quantized) == 14  # every decoder linear of both layers is 4-bit
        assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in quantized)
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        fresh = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map="cpu"
        )
        from peft import prepare_model_for_kbit_training

        from services.trainer.training.recipe import keep_4bit_training_layout

        fresh = prepare_model_for_kbit_training(fresh, use_gradient_checkpointing=False)  # same numerics as training
        keep_4bit_training_layout(fresh)
        fresh_4bit = {n: m.weight.data.clone() for n, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        trained_4bit = {
            n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight.data
            for n, m in trained.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)
        }
        assert set(fresh_4bit) == set(trained_4bit)
        assert all(torch.equal(fresh_4bit[n], trained_4bit[n]) for n in fresh_4bit)  # base bytes untouched
    import json

    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # QLoRA records the full-precision base
    reloaded = PeftModel.from_pretrained(fresh, result.output_dir)
    torch.testing.assert_close(_logits(reloaded, tokenizer), in_trainer, rtol=1e-4, atol=1e-4)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    assert not torch.allclose(base_logits, in_trainer.float(), atol=1e-2)


def test_packing_gives_the_same_loss_as_unpacked(tiny_model_dir, memorization_examples, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base = dict(base_model=str(tiny_model_dir), method="full", dataset_ids=["x"], batch_size=64, max_seq_length=512)
    unpacked = make_batches(memorization_examples, tokenizer, TrainConfig(**base))
    packed = make_batches(memorization_examples, tokenizer, TrainConfig(**base, packing=True))
    assert len(unpacked) == 1 and unpacked[0].input_ids.shape[0] == len(memorization_examples)
    assert len(packed) == 1 and packed[0].input_ids.shape[0] == 1  # all examples in one row
    assert packed[0].real_tokens == unpacked[0].real_tokens
    with torch.no_grad():
        loss_unpacked = model(**unpacked[0].model_inputs()).loss
        loss_packed = model(**packed[0].model_inputs()).loss
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-5)
    # Without the block-diagonal mask the examples would see each other and the loss would differ.
    leaky = packed[0].model_inputs() | {"attention_mask": torch.ones_like(packed[0].input_ids)}
    with torch.no_grad():
        assert abs(float(model(**leaky).loss) - float(loss_unpacked)) > 1e-3


def test_loss_only_on_assistant_tokens(tokenizer, memorization_examples):
    from services.trainer.training.tokenize import IGNORE, tokenize_example

    t = tokenize_example(tokenizer, memorization_examples[0], 512)
    learned = tokenizer.decode([tok for tok, lab in zip(t.input_ids, t.labels, strict=True) if lab != IGNORE])
    assert learned == "Arr, ship 0 be mine!<|im_end|>"


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_packed_batches_train_with_every_compute_dtype(tiny_model_dir, memorization_examples, tmp_path, method):
    """A packed (4-D mask) batch must work whatever dtype the attention runs in (QLoRA computes in bf16)."""
    _, result, losses, _ = _run(tiny_model_dir, memorization_examples, tmp_path, method, packing=True)
    assert result.kind == "lora_adapter" and losses[-1] < losses[0]


def test_qlora_gradients_are_unchanged_by_an_eval_pass(tiny_model_dir, memorization_examples, tokenizer):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference on its first eval
    forward (no double quantization, a matmul with no backward). A mid-run eval must change neither
    the base's quantization nor any gradient of the steps after it."""
    import bitsandbytes as bnb

    cfg = TrainConfig(base_model=str(tiny_model_dir), method="qlora", dataset_ids=["x"], lora_r=4, batch_size=4)
    batch = make_batches(memorization_examples, tokenizer, cfg)[0]

    def gradients(eval_first: bool):
        torch.manual_seed(0)
        model, _ = load_model(cfg, "cpu")
        with torch.no_grad():  # non-zero B: gradients then flow through every base layer to the A matrices
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(**batch.model_inputs())
        model.train()
        model(**batch.model_inputs()).loss.backward()
        states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, states

    plain, _ = gradients(eval_first=False)
    after_eval, states = gradients(eval_first=True)
    assert set(plain) == set(after_eval)
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], rtol=0, atol=0, msg=name)
    assert states and all(s.nested and s.quant_type == "nf4" for s in states)
