"""How close base + an extracted adapter comes to the tuned model it was extracted from.

Three measurements on the same token sequences, the tuned model as the reference:
- mean next-token KL(tuned || extracted) over every position of the eval sequences;
- greedy-token agreement: the tuned model continues each prompt greedily for `new_tokens`
  tokens; the share of those positions where the extracted model's argmax, fed the same prefix,
  is the same token (plus the share of prompts whose free-running greedy continuations are
  identical);
- eval loss of both on the sequences' labelled tokens (when the examples have labels).

Greedy decoding here is a plain argmax loop that ignores end-of-sequence, so it depends on
nothing but the two models' logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.trainer.data.records import Example
from services.trainer.worker.training.formatting import IGNORE, ChatFormatter

DEFAULT_PROMPTS = (
    "Tell me about the moon.",
    "What should I pack for a week of hiking?",
    "Explain how a bicycle stays upright.",
    "Write two sentences about the sea.",
)


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int] | None  # None: no reference answer (built-in prompts)
    prompt_length: int  # tokens before the first labelled one: the prompt greedy decoding continues


@dataclass
class Fidelity:
    kl_mean: float
    kl_tokens: int
    greedy_agreement: float
    greedy_exact_match: float
    eval_loss_tuned: float | None
    eval_loss_extracted: float | None
    samples: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {
            "extract_kl_mean": self.kl_mean,
            "extract_greedy_agreement": self.greedy_agreement,
            "extract_greedy_exact_match": self.greedy_exact_match,
            "extract_fidelity_tokens": float(self.kl_tokens),
            "extract_fidelity_prompts": float(len(self.samples)),
        }
        if self.eval_loss_tuned is not None and self.eval_loss_extracted is not None:
            out["eval_loss_tuned"] = self.eval_loss_tuned
            out["eval_loss_extracted"] = self.eval_loss_extracted
        return out


def sequences(tokenizer, examples: list[Example], max_len: int, limit: int) -> list[Sequence]:
    """Eval examples as token sequences (the trainer's own formatting), or the built-in prompts when there are none."""
    formatter = ChatFormatter(tokenizer)
    out = []
    for example in examples[:limit]:
        tokenized = formatter(example, max_len)
        labelled = [i for i, t in enumerate(tokenized.labels) if t != IGNORE]
        if len(tokenized.input_ids) < 2:
            continue
        if example.text is not None or not labelled:
            prompt_length = max(1, min(len(tokenized.input_ids) // 2, 32))
        else:
            prompt_length = labelled[0]
        out.append(Sequence(tokenized.input_ids, tokenized.labels, prompt_length))
    if out:
        return out
    for prompt in DEFAULT_PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        out.append(Sequence(list(ids), None, len(ids)))
    return out


@torch.no_grad()
def greedy(model, prompt: list[int], new_tokens: int, device) -> list[int]:
    """`new_tokens` argmax tokens after `prompt` (end-of-sequence is just another token)."""
    ids = torch.tensor([prompt], device=device)
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return out


@torch.no_grad()
def _log_probs(model, ids: list[int], device) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def measure(tuned, extracted, tokenizer, seqs: list[Sequence], new_tokens: int = 16, prompts: int = 8) -> Fidelity:
    """The three measurements (see the module docstring) over `seqs`; models are in eval mode on one device."""
    device = next(tuned.parameters()).device
    kl_sum, kl_tokens = 0.0, 0
    nll_tuned = nll_extracted = 0.0
    labelled = 0
    for seq in seqs:
        if seq.labels is None:
            continue
        p, q = _log_probs(tuned, seq.input_ids, device), _log_probs(extracted, seq.input_ids, device)
        kl = torch.sum(p.exp() * (p - q), dim=-1)[:-1]  # every position that has a next token
        kl_sum += float(kl.sum())
        kl_tokens += len(kl)
        targets = torch.tensor(seq.labels[1:], device=device)
        mask = targets != IGNORE
        if mask.any():
            rows = torch.arange(len(targets), device=device)[mask]
            nll_tuned -= float(p[:-1][rows, targets[mask]].sum())
            nll_extracted -= float(q[:-1][rows, targets[mask]].sum())
            labelled += int(mask.sum())
    agree = positions = exact = 0
    samples = []
    for seq in seqs[:prompts]:
        prompt = seq.input_ids[: seq.prompt_length]
        reference = greedy(tuned, prompt, new_tokens, device)
        full = prompt + reference
        q = _log_probs(extracted, full, device)
        predicted = q[len(prompt) - 1 : -1].argmax(-1).tolist()
        agree += sum(int(a == b) for a, b in zip(predicted, reference, strict=True))
        positions += len(reference)
        own = greedy(extracted, prompt, new_tokens, device)
        exact += int(own == reference)
        if seq.labels is None:  # built-in prompts: the KL is measured on the tuned model's own continuation
            p = _log_probs(tuned, full, device)
            kl = torch.sum(p.exp() * (p - q), dim=-1)[len(prompt) - 1 : -1]
            kl_sum += float(kl.sum())
            kl_tokens += len(kl)
        samples.append(
            {
                "prompt": tokenizer.decode(prompt),
                "tuned": tokenizer.decode(reference),
                "extracted": tokenizer.decode(own),
            }
        )
    return Fidelity(
        kl_mean=kl_sum / max(kl_tokens, 1),
        kl_tokens=kl_tokens,
        greedy_agreement=agree / max(positions, 1),
        greedy_exact_match=exact / max(len(samples), 1),
        eval_loss_tuned=nll_tuned / labelled if labelled else None,
        eval_loss_extracted=nll_extracted / labelled if labelled else None,
        samples=samples,
    )


def load_pair(base_dir: str, tuned_dir: str, delta: bool, adapter_dir: str):
    """(tuned model, base + extracted adapter), both in eval mode on one device, in float32 on the CPU
    and in the checkpoint's dtype on a GPU."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = "auto" if device.type == "cuda" else torch.float32
    if delta:
        tuned = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        params = dict(tuned.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(f"{tuned_dir}/delta.safetensors").items():
                params[name].copy_(tensor)
    else:
        tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    extracted = PeftModel.from_pretrained(base, adapter_dir)
    tuned.to(device)  # type: ignore[arg-type]  # transformers' typing of Module.to
    extracted.to(device)
    return tuned.eval(), extracted.eval()
