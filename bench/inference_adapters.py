"""Serving adapters per request: throughput and latency on one engine, service vs engine, cold starts.

    .venv/bin/python -m bench.inference_adapters [--requests 32] [--max-tokens 32] [--max-loras 4]

One registry and one inference service (one vLLM engine over the tiny model, `max_loras`
below 16 so the 16-adapter mix must swap) run in this process. For each workload (base
only, one adapter, 4 and 16 distinct adapters mixed) all requests are sent at once, first
straight to the engine, then through the gRPC service, and the table gives output tokens/s
and p50/p95 request latency for both (the ratio is the service's overhead). Last, the cold
start of a never-seen adapter: registry resolve + download + engine load + first token,
beside the same request once warm. Writes bench/results/inference_adapters.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench._common import print_table, write_json

PROMPTS = [
    "Tell me about the moon.",
    "Tell me about gold.",
    "Once upon a time",
    "Two plus two is",
    "The quick brown fox",
    "What is the weather like today?",
]


def make_adapters(base: Path, out: Path, count: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    dirs = []
    for i in range(count):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
        peft_model.save_pretrained(out / f"a{i}")
        dirs.append(out / f"a{i}")
    return dirs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=4)
    args = parser.parse_args()

    import grpc

    from services.adapter_registry.server import build_server as build_registry
    from services.adapter_registry.settings import RegistrySettings
    from services.common.server_thread import ServerThread
    from services.inference.adapters import lora_int_id
    from services.inference.server import build_server as build_inference
    from services.inference.settings import InferenceSettings
    from tunedock.client import RegistryClient
    from tunedock.tiny_model import build_tiny_model
    from tunedock.v1 import inference_pb2 as pb
    from tunedock.v1 import inference_pb2_grpc

    base = build_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    adapters = make_adapters(base, work / "adapters", 17)
    registry = ServerThread(lambda: build_registry(RegistrySettings(port=0, metrics_port=-1, data_dir=work)))
    with RegistryClient(registry.address) as client:
        for i, d in enumerate(adapters):
            client.publish_dir(d, f"bench-{i}")
    settings = InferenceSettings(
        port=0,
        metrics_port=-1,
        data_dir=work,
        base_model=str(base),
        registry_address=registry.address,
        max_loras=args.max_loras,
        max_cpu_loras=32,
        max_lora_rank=16,
        max_model_len=512,
        dtype="float32",
    )
    inference = ServerThread(lambda: build_inference(settings))
    core = inference.server.core
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(inference.address))
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": True}

    async def lora_for(name: str):
        if not name:
            return None
        _, entry = await core.acquire_adapter(name)
        core.cache.release(entry)
        return core.engine.lora_request(name, lora_int_id(entry.resolved.content_sha256), str(entry.path))

    async def direct(jobs):
        loras = {name: await lora_for(name) for name in {n for _, n in jobs}}

        async def one(prompt, name):
            started, tokens = time.perf_counter(), 0
            async for out in core.engine.generate(prompt, sampling, uuid.uuid4().hex, loras[name]):
                tokens += len(out.outputs[0].token_ids)
            return time.perf_counter() - started, tokens

        started = time.perf_counter()
        results = await asyncio.gather(*(one(p, n) for p, n in jobs))
        return time.perf_counter() - started, results

    def via_grpc(jobs):
        def one(job):
            prompt, name = job
            started = time.perf_counter()
            reply = stub.GenerateUnary(
                pb.GenerateUnaryRequest(
                    params=pb.GenerateParams(
                        prompt=prompt, adapter=name, sampling=pb.SamplingParams(max_tokens=args.max_tokens)
                    )
                ),
                timeout=600,
            )
            return time.perf_counter() - started, len(reply.completions[0].token_ids)

        started = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs))
        return time.perf_counter() - started, results

    workloads = {
        "base only": [""],
        "1 adapter": ["bench-0"],
        "4 adapters mixed": [f"bench-{i}" for i in range(4)],
        "16 adapters mixed": [f"bench-{i}" for i in range(16)],
    }
    rows, payload = [], {"max_loras": args.max_loras, "requests": args.requests, "max_tokens": args.max_tokens}
    try:
        # warm-up: every adapter downloaded and seen once, and one full-size batch (first batches compile)
        inference.run(direct([("warm", n) for names in workloads.values() for n in names]))
        inference.run(direct([(PROMPTS[i % len(PROMPTS)], "") for i in range(args.requests)]))
        via_grpc([(PROMPTS[i % len(PROMPTS)], "") for i in range(args.requests)])  # channel and threads
        for label, names in workloads.items():
            jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)]) for i in range(args.requests)]
            measured = {}
            for path, run in (
                ("engine", lambda j=jobs: inference.run(direct(j))),
                ("gRPC service", lambda j=jobs: via_grpc(j)),
            ):
                wall, results = run()
                latencies = [r[0] * 1e3 for r in results]
                tokens = sum(r[1] for r in results)
                measured[path] = {
                    "tokens_per_s": tokens / wall,
                    "p50_ms": statistics.median(latencies),
                    "p95_ms": percentile(latencies, 0.95),
                }
            payload[label] = measured
            e, g = measured["engine"], measured["gRPC service"]
            rows.append(
                [
                    label,
                    f"{e['tokens_per_s']:,.0f}",
                    f"{g['tokens_per_s']:,.0f}",
                    f"{g['tokens_per_s'] / e['tokens_per_s']:.2f}x",
                    f"{e['p50_ms']:.0f} / {e['p95_ms']:.0f}",
                    f"{g['p50_ms']:.0f} / {g['p95_ms']:.0f}",
                ]
            )

        # cold start of a never-seen adapter: resolve + download + load + first token
        def first_token(name: str) -> float:
            started = time.perf_counter()
            stub.GenerateUnary(
                pb.GenerateUnaryRequest(
                    params=pb.GenerateParams(prompt=PROMPTS[0], adapter=name, sampling=pb.SamplingParams(max_tokens=1))
                ),
                timeout=600,
            )
            return (time.perf_counter() - started) * 1e3

        cold = first_token("bench-16")
        warm = statistics.median(first_token("bench-16") for _ in range(5))
        payload["cold_start_ms"], payload["warm_first_token_ms"] = cold, warm
    finally:
        inference.stop()
        registry.stop()
        core.engine.shutdown()
    print_table(
        f"Adapters per request on one vLLM CPU engine: {args.requests} concurrent requests x "
        f"{args.max_tokens} tokens, max_loras={args.max_loras}",
        ["workload", "engine tok/s", "service tok/s", "service/engine", "engine p50/p95 ms", "service p50/p95 ms"],
        rows,
    )
    print(
        f"\ncold start of a never-seen adapter (resolve + download + load + 1 token): {cold:.0f} ms; "
        f"the same request warm: {warm:.0f} ms"
    )
    write_json("inference_adapters", payload)


if __name__ == "__main__":
    main()
