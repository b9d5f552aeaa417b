"""Extraction end to end: a Freeze job through the real trainer, extracted by a job, served by the session's engine.

The trainer runs as its own process beside the session's registry and vLLM engine (`stack_env`).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.data.records import parse_dataset
from services.trainer.worker.attempt import split
from services.trainer.worker.training.formatting import ChatFormatter
from tests.trainer.conftest import memorization_jsonl
from tunedock.client import RegistryClient, TrainerClient
from tunedock.client.channel import connect
from tunedock.errors import FailedPrecondition, InvalidArgument, NotFound
from tunedock.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tunedock.v1 import trainer_pb2 as pb

PROMPTS = ["What does the pirate say about ship 3?", "Tell me about the moon."]


@pytest.fixture(scope="module")
def clients(stack_env):
    trainer = TrainerClient(stack_env["TUNEDOCK_TRAINER_ADDRESS"], timeout=60)
    registry = RegistryClient(stack_env["TUNEDOCK_REGISTRY_ADDRESS"])
    yield trainer, registry
    trainer.close()
    registry.close()


@pytest.fixture(scope="module")
def freeze(clients, tiny_model_dir, tmp_path_factory):
    """A Freeze run of layer 1's k/v projections with a held-out split: (its ref, its dataset bytes)."""
    trainer, _ = clients
    data = memorization_jsonl(16)
    path = tmp_path_factory.mktemp("extract-data") / "pirate.jsonl"
    path.write_bytes(data)
    dataset = trainer.upload_dataset(path)
    spec = pb.JobSpec(
        base_model=str(tiny_model_dir),
        method=common_pb2.MethodConfig(
            freeze=common_pb2.FreezeConfig(trainable_layers=1, trainable_modules=["k_proj", "v_proj"])
        ),
        train_dataset_ids=[dataset.id],
        validation_split=0.25,
        output_name="ex-freeze",
        hyperparameters=pb.Hyperparameters(max_steps=16, learning_rate=1e-3, batch_size=4, seed=7),
    )
    done = trainer.wait(trainer.submit(spec).id, timeout=600)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    return done.output_ref, data


def _extracted(clients, source: str, name: str, **options) -> tuple[pb.Job, object]:
    trainer, registry = clients
    done = trainer.wait(trainer.extract(source, name, **options).id, timeout=600)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    return done, registry.get(done.output_ref)


def _tuned_model(tiny_model_dir, delta_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(delta_dir / "delta.safetensors")).items():
            params[name].copy_(tensor)
    return model.eval()


@torch.no_grad()
def _greedy_with_cache(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n argmax tokens through the KV cache, end-of-sequence included (the job decodes without a cache)."""
    out = model(input_ids=prompt, use_cache=True)
    tokens = [out.logits[0, -1].argmax()]
    for _ in range(n - 1):
        out = model(input_ids=tokens[-1].view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[0, -1].argmax())
    return torch.stack(tokens).view(1, n)


def _served_tokens(address: str, prompt: str, adapter: str) -> list[int]:
    channel = connect(address)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    params = inference_pb2.GenerateParams(
        prompt=prompt, adapter=adapter, sampling=inference_pb2.SamplingParams(max_tokens=12)
    )
    reply = stub.GenerateUnary(inference_pb2.GenerateUnaryRequest(params=params), timeout=120)
    channel.close()
    return list(reply.completions[0].token_ids)


def test_full_rank_extraction_serves_the_freeze_models_greedy_outputs(
    clients, freeze, stack_env, tiny_model_dir, tmp_path
):
    from transformers import AutoTokenizer

    source, _ = freeze
    _, version = _extracted(clients, source, "ex-freeze-full", rank=128)
    assert version.lineage.extracted_from == source and version.lora_rank == 128
    assert {label.key: label.value for label in version.labels}["extracted_from"] == source
    metrics = {m.name: m.value for m in version.lineage.metrics}
    assert metrics["extract_retained_energy"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["extract_kl_mean"] < 1e-6 and metrics["extract_greedy_agreement"] == 1.0
    assert metrics["retained_energy.layers.1.self_attn.k_proj"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["eval_loss_extracted"] == pytest.approx(metrics["eval_loss_tuned"], abs=1e-4)

    _, registry = clients
    registry.download(source, tmp_path / "source")
    tuned = _tuned_model(tiny_model_dir, tmp_path / "source")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        expected = tuned.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        served = _served_tokens(stack_env["TUNEDOCK_INFERENCE_ADDRESS"], prompt, version.name)
        assert served == expected[0, ids["input_ids"].shape[1] :].tolist()


def test_low_rank_fidelity_matches_an_independent_recomputation(clients, freeze, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, data = freeze
    job, version = _extracted(clients, source, "ex-freeze-r2", rank=2)
    metrics = {m.name: m.value for m in version.lineage.metrics}
    assert metrics["extract_rank"] == 2 and version.lora_rank == 2
    assert job.spec.validation_split == 0.25, "the source job's eval split is what fidelity is measured on"

    _, registry = clients
    registry.download(source, tmp_path / "source")
    registry.download(version.name, tmp_path / "adapter")
    report = json.loads((tmp_path / "adapter" / "extraction.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tuned = _tuned_model(tiny_model_dir, tmp_path / "source")
    extracted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    extracted.eval()

    # The same held-out examples the Freeze job evaluated on (same split, same seed), formatted as it trains.
    evals = split(0.25, 7, parse_dataset(data).examples, [])[1]
    assert report["fidelity"]["eval_examples"] == len(evals)
    formatter = ChatFormatter(tokenizer)
    kl_sum, kl_n, agree, positions = 0.0, 0, 0, 0
    for example in evals:
        tokenized = formatter(example, 512)
        ids = torch.tensor([tokenized.input_ids])
        with torch.no_grad():
            p = torch.log_softmax(tuned(input_ids=ids).logits[0, :-1].float(), -1)
            q = torch.log_softmax(extracted(input_ids=ids).logits[0, :-1].float(), -1)
        kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
        kl_sum, kl_n = kl_sum + float(kl.sum()), kl_n + len(kl)
        prompt_len = next(i for i, t in enumerate(tokenized.labels) if t != -100)
        prompt = ids[:, :prompt_len]
        with torch.no_grad():
            reference = torch.cat([prompt, _greedy_with_cache(tuned, prompt, 16)], dim=1)
            predicted = extracted(input_ids=reference).logits[0, prompt_len - 1 : -1].argmax(-1)
        agree += int((predicted == reference[0, prompt_len:]).sum())
        positions += 16
    assert metrics["extract_kl_mean"] == pytest.approx(kl_sum / kl_n, rel=1e-3)
    assert metrics["extract_greedy_agreement"] == pytest.approx(agree / positions)
    assert metrics["extract_kl_mean"] > 1e-4, "a rank-2 cut of a rank-128 change is not lossless"


def test_an_extraction_against_another_base_is_refused_at_submission(clients, freeze):
    from tests.conftest import MODEL_CACHE
    from tunedock.tiny_model import TinyModelSpec, build_tiny_model

    trainer, _ = clients
    other = build_tiny_model(TinyModelSpec(family="qwen2"), cache_dir=MODEL_CACHE)
    with pytest.raises(FailedPrecondition) as info:
        trainer.extract(freeze[0], "ex-other", rank=8, base_model=str(other))
    assert "a difference against another model is not a fine-tune" in info.value.message
    assert f"{freeze[0]} was trained from" in info.value.message


def test_bad_extractions_are_refused_at_submission(clients, freeze, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    trainer, registry = clients
    with pytest.raises(InvalidArgument) as info:
        trainer.extract(freeze[0], "ex-big", rank=256)
    assert "extract.rank 256 is above max_rank 128" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        trainer.extract(freeze[0], "ex-big", max_rank=256)
    assert "the inference replicas' max_lora_rank" in info.value.message
    with pytest.raises(NotFound):
        trainer.extract("ex-nothing:1", "ex-none", rank=8)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4))
    adapter.save_pretrained(tmp_path / "lora")
    registry.publish_dir(tmp_path / "lora", "ex-a-lora")
    with pytest.raises(FailedPrecondition) as info:
        trainer.extract("ex-a-lora", "ex-none", rank=8)
    assert "is a LoRA adapter already; serve it as it is" in info.value.message
