"""The training flow, in process, on the tiny model with real transformers/peft/bitsandbytes."""

from __future__ import annotations

import json

import pytest
import torch

from services.trainer.config import TrainConfig
from services.trainer.worker.training.batches import BatchPlan
from services.trainer.worker.training.distributed import Dist
from services.trainer.worker.training.events import Eval, Log, Progress
from services.trainer.worker.training.loss import CausalLMLoss, summed_loss
from services.trainer.worker.training.model import QuantSpec, load_base, prepare_4bit
from services.trainer.worker.training.recipe import Recipe, RunContext, expand_delta, tokenize_examples, train


def _config(tiny_model_dir, method, **overrides) -> TrainConfig:
    defaults = dict(
        max_steps=24, batch_size=4, learning_rate=3e-3 if method in ("lora", "qlora") else 1e-3, log_every_steps=4
    )
    return TrainConfig(base_model=str(tiny_model_dir), method=method, dataset_ids=["ds"], **(defaults | overrides))


def _run(tiny_model_dir, examples, tmp_path, method, **overrides):
    events = []
    cfg = _config(tiny_model_dir, method, **overrides)
    ctx = RunContext(tmp_path / "ckpt", tmp_path / "out", report=events.append, dist=Dist(device="cpu"))
    result = train(cfg, examples, examples[:2], ctx)
    losses = [e.loss for e in events if isinstance(e, Progress)]
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
    progress = [e for e in events if isinstance(e, Progress)]
    assert all(e.tokens_per_second > 0 and e.peak_memory_bytes > 0 and e.grad_norm > 0 for e in progress)
    assert progress[-1].step == progress[-1].total_steps == 24
    assert any(isinstance(e, Eval) for e in events)
    messages = [e.message for e in events if isinstance(e, Log)]
    assert any(m.startswith("attention: SDPA") for m in messages)  # the job says how it attends and computes


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

        quantized = [m for m in trained.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(quantized) == 14  # every decoder linear of both layers is 4-bit
        assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in quantized)
        # The same 4-bit base, loaded the way the recipe loads it (same numerics as training).
        fresh = prepare_4bit(
            load_base(str(tiny_model_dir), "cpu", torch.bfloat16, "sdpa", QuantSpec("nf4", True, torch.bfloat16)),
            gradient_checkpointing=False,
            autocast=False,
        )
        fresh_4bit = {n: m.weight.data.clone() for n, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        trained_4bit = {
            n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight.data
            for n, m in trained.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)
        }
        assert set(fresh_4bit) == set(trained_4bit)
        assert all(torch.equal(fresh_4bit[n], trained_4bit[n]) for n in fresh_4bit)  # base bytes untouched
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # QLoRA records the full-precision base
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]  # canonical: sorted
    reloaded = PeftModel.from_pretrained(fresh, result.output_dir)
    torch.testing.assert_close(_logits(reloaded, tokenizer), in_trainer, rtol=1e-4, atol=1e-4)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    assert not torch.allclose(base_logits, in_trainer.float(), atol=1e-2)


def _plans(tiny_model_dir, examples, tokenizer, tmp_path, batch_size=64):
    cfg = _config(tiny_model_dir, "full", batch_size=batch_size, max_seq_length=512)
    store, dropped = tokenize_examples(examples, tokenizer, 512, tmp_path / "tokens", lambda message: None)
    assert dropped == 0
    pad = tokenizer.pad_token_id
    unpacked = BatchPlan.build(store, cfg.batch_size, 512, packing=False, pad_id=pad)
    packed = BatchPlan.build(store, cfg.batch_size, 512, packing=True, pad_id=pad)
    return unpacked, packed


def test_packing_gives_the_same_loss_as_unpacked(tiny_model_dir, memorization_examples, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    module = CausalLMLoss(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).eval()
    unpacked, packed = _plans(tiny_model_dir, memorization_examples, tokenizer, tmp_path)
    assert len(unpacked) == 1 and unpacked.batch(0).input_ids.shape[0] == len(memorization_examples)
    one_row = packed.batch(0)
    assert len(packed) == 1 and one_row.input_ids.shape[0] == 1 and one_row.attention_mask is None  # no mask stored
    assert one_row.real_tokens == unpacked.batch(0).real_tokens
    assert one_row.loss_tokens == unpacked.batch(0).loss_tokens
    with torch.no_grad():
        loss_unpacked = module(**unpacked.batch(0).model_inputs())
        loss_packed = module(**one_row.model_inputs())
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-4)
    # Positions that do not restart would let the examples see each other: the loss differs.
    leaky = one_row.model_inputs() | {"position_ids": torch.arange(one_row.input_ids.shape[1]).unsqueeze(0)}
    with torch.no_grad():
        assert abs(float(module(**leaky)) - float(loss_unpacked)) > 1e-2


def test_chunked_loss_equals_the_plain_cross_entropy():
    """The loss from hidden states, computed a chunk at a time (soft-capped or not), equals the full-logits one."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 40))
    labels[:, :5] = -100  # a prompt without loss
    for softcap in (0.0, 3.0):
        logits = head(hidden).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        plain = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        (plain_grad,) = torch.autograd.grad(plain, hidden)
        chunked = summed_loss(hidden, head, labels, softcap, chunk_tokens=7)
        (chunked_grad,) = torch.autograd.grad(chunked, hidden)
        torch.testing.assert_close(chunked, plain)
        torch.testing.assert_close(chunked_grad, plain_grad)


def test_module_loss_equals_the_models_own_loss(tiny_model_dir, memorization_examples, tokenizer, tmp_path):
    """CausalLMLoss / token count == transformers' own causal LM loss on the same batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    unpacked, _ = _plans(tiny_model_dir, memorization_examples, tokenizer, tmp_path)
    batch = unpacked.batch(0)
    with torch.no_grad():
        ours = CausalLMLoss(model)(**batch.model_inputs()) / batch.loss_tokens
        theirs = model(**batch.model_inputs()).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_loss_only_on_assistant_tokens(tokenizer, memorization_examples, tmp_path):
    from services.trainer.worker.training.formatting import IGNORE, ChatFormatter

    t = ChatFormatter(tokenizer)(memorization_examples[0], 512)
    learned = tokenizer.decode([tok for tok, lab in zip(t.input_ids, t.labels, strict=True) if lab != IGNORE])
    assert learned == "Arr, ship 0 be mine!<|im_end|>"


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_packed_batches_train_with_every_compute_dtype(tiny_model_dir, memorization_examples, tmp_path, method):
    """A packed batch must work whatever dtype the attention runs in (QLoRA computes in bf16)."""
    _, result, losses, _ = _run(tiny_model_dir, memorization_examples, tmp_path, method, packing=True)
    assert result.kind == "lora_adapter" and losses[-1] < losses[0]


def test_qlora_gradients_are_unchanged_by_an_eval_pass(tiny_model_dir, memorization_examples, tmp_path):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference on its first eval
    forward (no double quantization, a matmul with no backward). A mid-run eval must change neither
    the base's quantization nor any gradient of the steps after it."""
    import bitsandbytes as bnb

    cfg = _config(tiny_model_dir, "qlora", lora_r=4)

    def gradients(eval_first: bool):
        torch.manual_seed(0)
        recipe = Recipe(cfg, RunContext(tmp_path / f"c{eval_first}", tmp_path / f"o{eval_first}"))
        recipe.setup(memorization_examples, memorization_examples[:2])
        with torch.no_grad():  # non-zero B: gradients then flow through every base layer to the A matrices
            for name, param in recipe.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        if eval_first:
            recipe.evaluate()
        batch = recipe.train_stream.batch(0)
        (recipe.module(**batch.model_inputs()) / batch.loss_tokens).backward()
        states = [m.weight.quant_state for m in recipe.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.requires_grad}, states

    plain, _ = gradients(eval_first=False)
    after_eval, states = gradients(eval_first=True)
    assert set(plain) == set(after_eval)
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], rtol=0, atol=0, msg=name)
    assert states and all(s.nested and s.quant_type == "nf4" for s in states)


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tiny_model_dir, memorization_examples, tmp_path):
    """Stopped after its step-4 checkpoint and resumed, a run with dropout reaches the same weights as one that
    never stopped: trainable weights, optimizer, schedule and every RNG come back from the checkpoint."""
    cfg = _config(
        tiny_model_dir, "lora", max_steps=8, lora_r=4, lora_dropout=0.3, checkpoint_every_steps=4, log_every_steps=1
    )
    steps_seen = []

    def run(name: str, stop_after: int | None = None):
        def report(event):
            if isinstance(event, Progress):
                steps_seen.append((name, event.step))

        ctx = RunContext(
            tmp_path / name / "ckpt",
            tmp_path / name / "out",
            report=report,
            should_stop=lambda: stop_after is not None and steps_seen[-1:] == [(name, stop_after)],
        )
        return train(cfg, memorization_examples, [], ctx)

    whole = run("whole")
    assert run("split", stop_after=5).stopped
    resumed = run("split")
    assert [s for n, s in steps_seen if n == "split"] == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # from the step-4 checkpoint
    after = dict(resumed.model.named_parameters())
    for name, param in whole.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(after[name], param, rtol=0, atol=0, msg=name)


def test_a_hub_id_base_is_fingerprinted_from_its_cached_snapshot(tiny_model_dir, tmp_path, monkeypatch):
    """A base given as a hub id fingerprints the cached snapshot, not an empty path (every hub base looked alike)."""
    import hashlib
    import shutil

    from services.common.basemodels import base_fingerprint
    from tunedock.fingerprint import fingerprint_model_dir

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    fingerprint = base_fingerprint("acme/tiny")
    assert fingerprint == fingerprint_model_dir(tiny_model_dir)
    assert fingerprint != hashlib.sha256(b"").hexdigest()
    assert base_fingerprint("acme/not-cached") == ""  # unknown, not the fingerprint of nothing
    assert fingerprint_model_dir(tmp_path / "nothing-here") == ""


def test_collectives_refuse_tensors_off_the_process_groups_device():
    """NCCL reduces CUDA tensors only; a tensor elsewhere is refused with the devices named, not sent."""
    dist = Dist(rank=0, world_size=2, launched=True, device="meta")
    with pytest.raises(ValueError, match="collective on cpu, but this process group reduces on meta"):
        dist.sum_(torch.zeros(1))
    assert Dist(device="cuda:0").backend == "nccl" and Dist(device="cpu").backend == "gloo"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: NCCL reduces only CUDA tensors")
def test_one_gpu_trains_through_an_nccl_process_group(tiny_model_dir, memorization_examples, tmp_path):
    """Under torchrun even one GPU joins an NCCL group, so this is the path eight GPUs take."""
    import os

    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29591", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist = Dist.from_env()
    dist.init()
    try:
        assert td.get_backend() == "nccl"
        ctx = RunContext(tmp_path / "c", tmp_path / "o", dist=dist)
        result = train(_config(tiny_model_dir, "lora", max_steps=4), memorization_examples, [], ctx)
        assert result.kind == "lora_adapter"
    finally:
        dist.close()
