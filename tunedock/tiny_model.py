"""Build the tiny Llama-architecture model that tests and the demo run on.

No model hub is reachable at run time, so TuneDock ships a recipe instead of weights:
a byte-level BPE tokenizer trained on a small corpus in this package, and a randomly
initialised 2-layer Llama (head dim 64) saved in the standard Hugging Face layout
(safetensors, config.json, tokenizer files, a chat template). The same code paths that
take this directory take a hub id or a local path of a real model.

The build is deterministic for a given seed and cached: the directory name carries a
hash of the recipe, so a changed recipe builds a new model instead of reusing a stale one.
Heavy imports (torch, transformers, tokenizers) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

# ChatML-style template. `{% generation %}` marks assistant text so that
# `return_assistant_tokens_mask` can tell the trainer where the loss belongs.
CHAT_TEMPLATE = (
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


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. Defaults give ~2.3M parameters."""

    seed: int = 0
    """Seed for the weight initialisation."""
    vocab_size: int = 1024
    """Target BPE vocabulary (the embedding is rounded up to a multiple of 64)."""
    hidden_size: int = 256
    """Model width; heads are 64 wide, so this must be a multiple of 64."""
    intermediate_size: int = 512
    """MLP width."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_key_value_heads: int = 2
    """KV heads (grouped-query attention)."""
    max_position_embeddings: int = 1024
    """Longest sequence the model accepts."""

    def __post_init__(self) -> None:
        if self.hidden_size % 64:
            raise ValueError(f"hidden_size must be a multiple of 64 (head dim), got {self.hidden_size}")
        heads = self.hidden_size // 64
        if heads % self.num_key_value_heads:
            raise ValueError(f"{heads} attention heads are not divisible by {self.num_key_value_heads} KV heads")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 bytes plus special tokens and merges)")

    def fingerprint(self) -> str:
        """Hash of everything that determines the built files."""
        corpus = _corpus_text()
        blob = json.dumps({"spec": asdict(self), "template": CHAT_TEMPLATE, "corpus": corpus, "recipe": 1})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _corpus_text() -> str:
    return resources.files("tunedock.data").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def default_home() -> Path:
    """TuneDock's data directory: $TUNEDOCK_HOME or ~/.tunedock."""
    return Path(os.environ.get("TUNEDOCK_HOME", Path.home() / ".tunedock")).expanduser()


def tiny_model_path(spec: TinyModelSpec | None = None, cache_dir: Path | None = None) -> Path:
    """Where the model for `spec` lives (built or not)."""
    spec = spec or TinyModelSpec()
    root = Path(cache_dir) if cache_dir else default_home() / "models"
    return root / f"tiny-llama-s{spec.seed}-{spec.fingerprint()}"


def build_tiny_model(spec: TinyModelSpec | None = None, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) the tiny model and return its directory.

    The directory is complete or absent: files are written to a temporary sibling and
    renamed into place, so concurrent builders and interrupted builds never leave a
    half-written model behind.
    """
    spec = spec or TinyModelSpec()
    target = tiny_model_path(spec, cache_dir)
    if target.joinpath("config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    staging.chmod(0o755)
    try:
        tokenizer = _build_tokenizer(spec)
        tokenizer.save_pretrained(staging)
        _build_model(spec, vocab_size=len(tokenizer), tokenizer=tokenizer).save_pretrained(staging)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not target.joinpath("config.json").exists():
                raise
            # Another process finished the same build first: theirs is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_model(spec: TinyModelSpec, vocab_size: int, tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    padded_vocab = -(-vocab_size // 64) * 64
    config = LlamaConfig(
        vocab_size=padded_vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.hidden_size // 64,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=64,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
        # A larger init than the usual 0.02 so that the random model's greedy output
        # varies with the prompt instead of collapsing onto one token.
        initializer_range=0.1,
        dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny local model (cached).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    print(build_tiny_model(TinyModelSpec(seed=args.seed), args.cache_dir, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
