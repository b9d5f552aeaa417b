"""Build the tiny models that tests and the demo run on: one per model family, from config classes.

No model hub is reachable at run time, so TuneDock ships a recipe instead of weights:
a byte-level BPE tokenizer trained on a small corpus in this package, and a randomly
initialised 2-layer model saved in the standard Hugging Face layout (safetensors,
config.json, tokenizer files, a chat template). The default is a Llama-architecture model
with a ChatML template; `TinyModelSpec(family=...)` builds Qwen2, Mistral, Gemma2, Gemma3
(text, or the multimodal class), Phi3 or Llama with a Llama-3 template instead: the same
architecture classes as the public checkpoints, each with a minimal chat template that has
the structure of the family's public one (Mistral puts the system prompt in the last user
turn, Gemma2 refuses a system role, Phi-3.5 ends a conversation with an EOS that the next
turn replaces, Qwen2.5 renders tools and tool calls; so does the default ChatML template).
The same code paths that take these directories take a hub id or a local path of a real model.

The build is deterministic for a given spec and cached: the directory name carries a
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
# `return_assistant_tokens_mask` can tell the trainer where the loss belongs. With `tools` it
# renders them as Qwen2.5's template does (a system block listing them; calls as
# <tool_call>{"name", "arguments"}</tool_call>; results as <tool_response> user turns), so
# tool-calling data trains and serves on the default model (vLLM's "hermes" parser reads the calls).
# Without tools the rendering is what it was before tools existed.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if tools %}{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\n<tools>' }}{% for tool in tools %}{{ '\n' + tool | tojson }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object within <tool_call></tool_call> tags."
    "<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] }}"
    "{%- for call in message['tool_calls'] | default([]) %}"
    "{%- if not loop.first or message['content'] %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{- call['function']['arguments'] | tojson }}{{ '}\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Minimal chat templates with the structure of each family's public one (see the module doc).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}You are a helpful assistant.{% endif %}"
    "{{ '\n\n# Tools\n\n<tools>' }}{% for tool in tools %}{{ '\n' + tool | tojson }}{% endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{ '\n' + message['content'] }}{% endif %}"
    "{%- for call in message['tool_calls'] | default([]) %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{- call['function']['arguments'] | tojson }}{{ '}\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate') }}{% endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}{% endif %}"
    "{%- endfor %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{%- for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A model family's architecture (a transformers config class) and its tokenizer conventions."""

    config: str
    """Name of the transformers config class."""
    bos: str
    eos: str
    pad: str
    end_of_turn: str
    """The token that ends an assistant turn (a generation stop token beside eos)."""
    turn_tokens: tuple[str, ...]
    """Every other special token the chat template uses."""
    template: str
    extra: tuple[tuple[str, object], ...] = ()
    """Config fields beyond the shared shape (sliding windows, soft-capping, tied embeddings)."""
    multimodal: bool = False
    """Gemma3ForConditionalGeneration: a tiny vision tower beside the language model."""


FAMILIES: dict[str, Family] = {
    # TuneDock's own default: Llama architecture, ChatML template with {% generation %} marks.
    "llama": Family("LlamaConfig", BOS, EOS, PAD, IM_END, (IM_START, IM_END), CHAT_TEMPLATE),
    "llama3": Family(
        "LlamaConfig",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|finetune_right_pad_id|>",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        LLAMA3_TEMPLATE,
    ),
    "qwen2": Family(
        "Qwen2Config",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|im_end|>",
        ("<|im_start|>", "<|im_end|>"),
        QWEN2_TEMPLATE,
        (("tie_word_embeddings", True),),
    ),
    "mistral": Family(
        "MistralConfig",
        "<s>",
        "</s>",
        "<unk>",
        "</s>",
        ("[INST]", "[/INST]"),
        MISTRAL_TEMPLATE,
        (("sliding_window", 16),),
    ),
    "gemma2": Family(
        "Gemma2Config",
        "<bos>",
        "<eos>",
        "<pad>",
        "<end_of_turn>",
        ("<start_of_turn>", "<end_of_turn>"),
        GEMMA2_TEMPLATE,
        (
            ("sliding_window", 16),
            ("attn_logit_softcapping", 50.0),
            ("final_logit_softcapping", 30.0),
            ("tie_word_embeddings", True),
        ),
    ),
    "gemma3": Family(
        "Gemma3TextConfig",
        "<bos>",
        "<eos>",
        "<pad>",
        "<end_of_turn>",
        ("<start_of_turn>", "<end_of_turn>"),
        GEMMA3_TEMPLATE,
        (
            ("sliding_window", 16),
            ("layer_types", ("sliding_attention", "full_attention")),
            ("tie_word_embeddings", True),
        ),
    ),
    "gemma3-mm": Family(
        "Gemma3Config",
        "<bos>",
        "<eos>",
        "<pad>",
        "<end_of_turn>",
        ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        GEMMA3_TEMPLATE,
        (
            ("sliding_window", 16),
            ("layer_types", ("sliding_attention", "full_attention")),
            ("tie_word_embeddings", True),
        ),
        multimodal=True,
    ),
    "phi3": Family(
        "Phi3Config",
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|end|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        PHI3_TEMPLATE,
        (("sliding_window", 16),),
    ),
}
FAMILY_MATRIX = ("llama3", "qwen2", "mistral", "gemma2", "gemma3", "gemma3-mm", "phi3")
"""The families every training, chat-formatting and serving path is checked on."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. Defaults give ~2.3M parameters."""

    seed: int = 0
    """Seed for the weight initialisation."""
    family: str = "llama"
    """A key of FAMILIES: the architecture and the chat template."""
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
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)}")
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
        spec = asdict(self)
        recipe: dict = {"template": CHAT_TEMPLATE, "corpus": corpus, "recipe": 1}
        if self.family == "llama":
            del spec["family"]  # the default model keeps the hash (and cache) it had before families existed
        else:
            recipe["family"] = asdict(FAMILIES[self.family])
        blob = json.dumps({"spec": spec, **recipe}, default=str)
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
    return root / f"tiny-{spec.family}-s{spec.seed}-{spec.fingerprint()}"


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

    family = FAMILIES[spec.family]
    specials = list(dict.fromkeys([family.bos, family.eos, family.pad, *family.turn_tokens]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        additional_special_tokens=[t for t in family.turn_tokens if t not in (family.bos, family.eos, family.pad)],
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = family.template
    return fast


def _build_model(spec: TinyModelSpec, vocab_size: int, tokenizer):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[spec.family]
    padded_vocab = -(-vocab_size // 64) * 64
    stop = [tokenizer.convert_tokens_to_ids(family.eos), tokenizer.convert_tokens_to_ids(family.end_of_turn)]
    text = dict(
        vocab_size=padded_vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.hidden_size // 64,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(family.bos),
        eos_token_id=list(dict.fromkeys(stop)),
        pad_token_id=tokenizer.convert_tokens_to_ids(family.pad),
        # A larger init than the usual 0.02 so that the random model's greedy output
        # varies with the prompt instead of collapsing onto one token.
        initializer_range=0.1,
        dtype="float32",
    )
    if family.config != "Phi3Config":  # Phi3 derives its head size from hidden_size / heads
        text["head_dim"] = 64
    text.update({key: list(value) if isinstance(value, tuple) else value for key, value in family.extra})
    config_class = getattr(transformers, family.config)
    if family.multimodal:
        tie = text.pop("tie_word_embeddings")
        config = config_class(
            text_config=text,
            vision_config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
            image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
            tie_word_embeddings=tie,
            initializer_range=text["initializer_range"],
            dtype="float32",
        )
    else:
        config = config_class(**text)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"]
    )
    return model


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny local model (cached).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    print(build_tiny_model(TinyModelSpec(seed=args.seed, family=args.family), args.cache_dir, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
