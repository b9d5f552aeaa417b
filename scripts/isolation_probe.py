"""Does vLLM's CPU LoRA path keep a request's greedy output independent of its batch-mates?

    .venv/bin/python scripts/isolation_probe.py [--isolation off|auto|null-adapter] [--max-loras 4]

Starts one engine over the tiny model with the given isolation (default off: vLLM's own CPU ops,
unfixed), makes three random LoRA adapters, and compares each request's solo greedy tokens
with its tokens when 32 mixed base/adapter requests run concurrently.
Prints how many requests differed, per kind. Exit 0 either way: this is a probe, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = ["What does the pirate say about ship 3?", "Tell me about the moon.", "Two plus two is", "Once upon a time"]


def make_adapters(base: Path, out: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        )
        model.save_pretrained(out / f"a{seed}")
        dirs.append(out / f"a{seed}")
    return dirs


async def probe(isolation: str, max_loras: int) -> tuple[dict[str, int], str]:
    from services.inference.engine import Engine, EngineOptions
    from tunedock.tiny_model import build_tiny_model

    base = build_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="isolation-"))
    adapters = make_adapters(base, work)
    engine = Engine(
        EngineOptions(
            str(base),
            max_loras=max_loras,
            max_cpu_loras=8,
            max_lora_rank=16,
            max_model_len=512,
            dtype="float32",
            kv_cache_gib=1,
            work_dir=work,
            isolation=isolation,
        )
    )
    requests = [None] + [engine.lora_request(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]

    async def run(prompt, lora):
        tokens = []
        async for out in engine.generate(
            prompt, {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}, uuid.uuid4().hex, lora
        ):
            tokens.extend(out.outputs[0].token_ids)
        return tokens

    jobs = [(PROMPTS[i % 4], i % 4) for i in range(32)]
    solo = {job: await run(job[0], requests[job[1]]) for job in set(jobs)}
    together = await asyncio.gather(*(run(p, requests[k]) for p, k in jobs))
    differed = {"base": 0, "adapter": 0}
    for job, tokens in zip(jobs, together, strict=True):
        if tokens != solo[job]:
            differed["base" if job[1] == 0 else "adapter"] += 1
    engine.shutdown()
    return differed, engine.isolation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--isolation", default="off", choices=["auto", "null-adapter", "off"])
    parser.add_argument("--max-loras", type=int, default=4)
    args = parser.parse_args()
    differed, mode = asyncio.run(probe(args.isolation, args.max_loras))
    print(
        f"isolation={args.isolation} ({mode}) max_loras={args.max_loras}: of 32 concurrent requests "
        f"(8 base, 24 adapter), {differed['base']} base and {differed['adapter']} adapter outputs differed "
        "from their solo runs"
    )


if __name__ == "__main__":
    main()
