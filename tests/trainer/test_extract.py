"""Extraction in process: a real Freeze run on the tiny model, cut into LoRA adapters, checked against torch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.config import ExtractOptions, TrainConfig
from services.trainer.worker.training.distributed import Dist
from services.trainer.worker.training.extract import canonical, extract_lora
from services.trainer.worker.training.recipe import RunContext, train
from tunedock.errors import FailedPrecondition, InvalidArgument


def _freeze(tiny_model_dir, examples, out, **freeze):
    cfg = TrainConfig(
        base_model=str(tiny_model_dir),
        method="freeze",
        dataset_ids=["ds"],
        max_steps=16,
        batch_size=4,
        learning_rate=1e-3,
        **freeze,
    )
    ctx = RunContext(out / "ckpt", out / "out", report=lambda event: None, dist=Dist(device="cpu"))
    return train(cfg, examples, examples[:2], ctx).output_dir


@pytest.fixture(scope="module")
def kv_delta(tiny_model_dir, memorization_examples, tmp_path_factory):
    """A Freeze delta of layer 1's k/v projections (128 x 256 each, so rank 128 is their full rank)."""
    out = tmp_path_factory.mktemp("freeze-kv")
    return _freeze(
        tiny_model_dir, memorization_examples, out, trainable_layers=1, trainable_modules=["k_proj", "v_proj"]
    )


def _differences(tiny_model_dir, delta_dir) -> dict[str, torch.Tensor]:
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    return {name: tensor - base[name] for name, tensor in load_file(str(delta_dir / "delta.safetensors")).items()}


def _extract(tiny_model_dir, delta_dir, out, **options):
    return extract_lora(
        tiny_model_dir,
        [delta_dir / "delta.safetensors"],
        True,
        ExtractOptions(**({"max_rank": 128} | options)),
        out,
        str(tiny_model_dir),
        "freeze:1",
    )


def _products(adapter_dir) -> dict[str, torch.Tensor]:
    """alpha / r * B @ A per module, keyed like the base's weights."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for name, a in tensors.items():
        if ".lora_A." in name:
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            out[name.removeprefix("base_model.model.").replace(".lora_A", "")] = scale * b.float() @ a.float()
    return out


def test_full_rank_reproduces_the_freeze_model(tiny_model_dir, kv_delta, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extraction = _extract(tiny_model_dir, kv_delta, tmp_path / "adapter", rank=128)
    assert extraction.rank == 128 and extraction.dropped == {}
    assert sorted(m.key for m in extraction.modules) == ["layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj"]
    assert extraction.retained_share == pytest.approx(1.0, abs=1e-6)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "v_proj"] and config["layers_to_transform"] == [1]
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] == 128
    products = _products(tmp_path / "adapter")
    for name, diff in _differences(tiny_model_dir, kv_delta).items():
        torch.testing.assert_close(products[name], diff, atol=1e-6, rtol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(kv_delta / "delta.safetensors")).items():
            params[name].copy_(tensor)
    extracted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    ids = tokenizer("What does the pirate say about ship 3?", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(extracted(**ids).logits, tuned(**ids).logits, atol=1e-4, rtol=1e-4)


def test_discarded_energy_is_the_sum_of_the_dropped_squared_singular_values(tiny_model_dir, kv_delta, tmp_path):
    rank = 4
    extraction = _extract(tiny_model_dir, kv_delta, tmp_path / "adapter", rank=rank)
    products = _products(tmp_path / "adapter")
    by_key = {m.key: m for m in extraction.modules}
    for name, diff in _differences(tiny_model_dir, kv_delta).items():
        s = torch.linalg.svdvals(diff.double())
        report = by_key[canonical(name).removesuffix(".weight")]
        assert report.energy == pytest.approx(float((s**2).sum()), rel=1e-6)
        assert report.discarded == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-5)
        # What the adapter holds is the best rank-4 approximation, with exactly that residual.
        residual = float(((diff.double() - products[name].double()) ** 2).sum())
        assert residual == pytest.approx(report.discarded, rel=1e-4)


def test_energy_picks_the_smallest_rank_that_keeps_the_share(tiny_model_dir, kv_delta, tmp_path):
    extraction = _extract(tiny_model_dir, kv_delta, tmp_path / "adapter", energy=0.8)
    spectra = [torch.linalg.svdvals(d.double()) ** 2 for d in _differences(tiny_model_dir, kv_delta).values()]
    total = sum(float(s.sum()) for s in spectra)

    def kept(r: int) -> float:
        return sum(float(s[:r].sum()) for s in spectra) / total

    r = extraction.rank
    assert kept(r) >= 0.8 > kept(r - 1)
    assert extraction.retained_share == pytest.approx(kept(r), rel=1e-6)
    capped = _extract(tiny_model_dir, kv_delta, tmp_path / "capped", energy=0.99, max_rank=8)
    assert capped.rank == 8 and "less than the 99% asked for" in capped.notes[0]


def test_a_delta_only_in_lm_head_is_refused_saying_what_is_dropped(tiny_model_dir, memorization_examples, tmp_path):
    delta = _freeze(tiny_model_dir, memorization_examples, tmp_path, trainable_layers=0, extra_modules=["lm_head"])
    with pytest.raises(FailedPrecondition) as info:
        _extract(tiny_model_dir, delta, tmp_path / "adapter", rank=8)
    message = info.value.message
    assert "all of its change is in tensors LoRA cannot carry (lm_head.weight 100.0%)" in message
    assert "no LoRA form that vLLM hot-swaps" in message
    assert not (tmp_path / "adapter").exists()


def test_dropped_tensors_above_the_threshold_need_allow_dropped(tiny_model_dir, memorization_examples, tmp_path):
    delta = _freeze(
        tiny_model_dir,
        memorization_examples,
        tmp_path,
        trainable_layers=1,
        trainable_modules=["mlp"],
        extra_modules=["lm_head"],
    )
    with pytest.raises(FailedPrecondition) as info:
        _extract(tiny_model_dir, delta, tmp_path / "refused", rank=8)
    assert "above the 5% threshold" in info.value.message and "--allow-dropped" in info.value.message
    extraction = _extract(tiny_model_dir, delta, tmp_path / "allowed", rank=8, allow_dropped=True)
    diffs = _differences(tiny_model_dir, delta)
    head = float((diffs["lm_head.weight"].double() ** 2).sum())
    total = sum(float((d.double() ** 2).sum()) for d in diffs.values())
    assert extraction.dropped == {"lm_head.weight": pytest.approx(head, rel=1e-6)}
    assert extraction.dropped_share == pytest.approx(head / total, rel=1e-6)
    assert {m.key.rsplit(".", 1)[1] for m in extraction.modules} == {"gate_proj", "up_proj", "down_proj"}


def test_a_model_of_another_shape_is_refused(tiny_model_dir, tmp_path):
    from tunedock.tiny_model import TinyModelSpec, build_tiny_model

    other = build_tiny_model(TinyModelSpec(hidden_size=128), cache_dir=tmp_path / "models")
    with pytest.raises(FailedPrecondition) as info:
        extract_lora(
            tiny_model_dir,
            sorted(other.glob("*.safetensors")),
            False,
            ExtractOptions(rank=4),
            tmp_path / "adapter",
            str(tiny_model_dir),
            "other:1",
        )
    assert "they were not trained from this base" in info.value.message


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 128, "max_rank": 64}, "extract.rank 128 is above max_rank 64"),
        ({"energy": 1.5}, "extract.energy must be in (0, 1]"),
        ({"max_dropped_share": 1.0}, "extract.max_dropped_share must be in [0, 1)"),
        ({"rank": -1}, "extract.rank must be >= 0"),
    ],
)
def test_options_out_of_range_are_refused(options, message):
    with pytest.raises(InvalidArgument) as info:
        ExtractOptions(**options)
    assert message in info.value.message


def test_canonical_names_agree_across_checkpoint_and_module_spellings():
    assert canonical("language_model.model.layers.0.mlp.down_proj.weight") == "layers.0.mlp.down_proj.weight"
    assert canonical("model.language_model.layers.0.mlp.down_proj.weight") == "layers.0.mlp.down_proj.weight"
    assert canonical("model.layers.3.self_attn.q_proj.weight") == "layers.3.self_attn.q_proj.weight"
    assert canonical("lm_head.weight") == "lm_head.weight"
