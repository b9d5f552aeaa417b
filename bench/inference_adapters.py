"""Serving adapters per request: the bare engine vs the service, on the same engine, in one run.

    .venv/bin/python -m bench.inference_adapters [--requests 32] [--max-tokens 32] [--max-loras 4] [--repeats 5]

One registry and one inference service (one vLLM engine over the tiny model) run in this process.
Workloads, all requests sent at once: base only, one adapter, 4 adapters mixed, 16 adapters mixed
(more than `max_loras`, so adapters must take turns in the engine's slots). Each is run straight
on the engine (no isolation guard, FIFO: what vLLM does alone) and through the gRPC service (its
isolation, adapter-aware admission, resolution), from a client in another process (a client's
threads would otherwise compete with the server for this process's interpreter lock; it fires
every request from one asyncio thread and reports the CPU it used). Besides, base requests
through the all-zero adapter (what the old isolation guard cost), and, where a workload has more
adapters than slots, the engine fed in perfect waves of `max_loras` adapters: the most any
admission order could add over vLLM's own scheduling of that workload.

Prints output tokens/s and p50/p95 latency (median of `--repeats` runs) and writes
bench/results/inference_adapters.json:
  {"workloads": {"base"|"one_adapter"|"mixed_4"|"swap_16": {"engine_tok_s", "service_tok_s", ...}},
   "base_guard_off_tok_s", "base_null_adapter_tok_s", "isolation_mode", ...}
  (swap_16 also has "engine_in_waves_tok_s" and "waves_ratio")
Targets: service/engine >= 0.95 for base and one_adapter, >= 1.3 for swap_16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench._common import ROOT, print_table, write_json

PROMPTS = [
    "Tell me about the moon.",
    "Tell me about gold.",
    "Once upon a time",
    "Two plus two is",
    "The quick brown fox",
    "What is the weather like today?",
]
WORKLOADS = {
    "base": [""],
    "one_adapter": ["bench-0"],
    "mixed_4": [f"bench-{i}" for i in range(4)],
    "swap_16": [f"bench-{i}" for i in range(16)],
}
TARGETS = {"base": 0.95, "one_adapter": 0.95, "swap_16": 1.3}


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


def summary(wall: float, results: list[tuple[float, int]]) -> dict:
    latencies = [r[0] * 1e3 for r in results]
    return {
        "tok_s": sum(r[1] for r in results) / wall,
        "p50_ms": statistics.median(latencies),
        "p95_ms": percentile(latencies, 0.95),
    }


def client_main(address: str, jobs_json: str, max_tokens: int) -> None:
    """In its own process: send every job at once through the gRPC service; print the measurements.

    One asyncio channel fires all requests from one thread: a thread per request would spend
    this 2-core machine's CPU on the client, which the engine and the service share.
    """
    import resource

    import grpc

    from tunedock.v1 import inference_pb2 as pb
    from tunedock.v1 import inference_pb2_grpc

    jobs = json.loads(jobs_json)
    requests = [
        pb.GenerateUnaryRequest(
            params=pb.GenerateParams(prompt=prompt, adapter=name, sampling=pb.SamplingParams(max_tokens=max_tokens))
        )
        for prompt, name in jobs
    ]

    async def run() -> dict:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def one(request):
                started = time.perf_counter()
                reply = await stub.GenerateUnary(request, timeout=600)
                return time.perf_counter() - started, len(reply.completions[0].token_ids)

            await asyncio.gather(*(one(r) for r in requests[:4]))  # the channel warm
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            results = await asyncio.gather(*(one(r) for r in requests))
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            client_cpu = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
            return {"wall": wall, "results": results, "client_cpu_s": client_cpu}

    print("RESULT " + json.dumps(asyncio.run(run())), flush=True)


def via_service(address: str, jobs, max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "bench.inference_adapters", "--client", address, json.dumps(jobs), str(max_tokens)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    data = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {**summary(data["wall"], data["results"]), "client_cpu_s": data["client_cpu_s"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from services.adapter_registry.server import build_server as build_registry
    from services.adapter_registry.settings import RegistrySettings
    from services.common.server_thread import ServerThread
    from services.inference.engine import write_null_adapter
    from services.inference.server import build_server as build_inference
    from services.inference.settings import InferenceSettings
    from tunedock.client import RegistryClient
    from tunedock.tiny_model import build_tiny_model

    base = build_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    adapters = make_adapters(base, work / "adapters", 16)
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
    )
    inference = ServerThread(lambda: build_inference(settings))
    core = inference.server.core
    engine = core.engine
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}  # greedy: both paths stop at the same EOS
    null = engine.lora_request("__null__", 2**31 - 1, str(write_null_adapter(str(base), work / "null")))

    async def lora_for(name: str):
        if not name:
            return None
        _, entry = await core.acquire_adapter(name)
        core.cache.release(entry)
        return engine.lora_request(name, core.lora_ids(entry.resolved.content_sha256), str(entry.path))

    async def direct(jobs, base_lora=None):
        """Straight to the engine, everything at once: no guard, no admission (FIFO)."""
        loras = {name: await lora_for(name) for name in {n for _, n in jobs}}
        loras[""] = base_lora
        started = time.perf_counter()
        results = await asyncio.gather(*(one(p, loras[n]) for p, n in jobs))
        return summary(time.perf_counter() - started, results)

    async def in_waves(jobs):
        """Straight to the engine, `max_loras` adapters at a time, each wave after the last: what a
        perfect admission order achieves when no batch may hold more than `max_loras` adapters."""
        names = sorted({n for _, n in jobs})
        loras = {name: await lora_for(name) for name in names}
        started, results = time.perf_counter(), []
        for first in range(0, len(names), args.max_loras):
            wave = set(names[first : first + args.max_loras])
            results += await asyncio.gather(*(one(p, loras[n]) for p, n in jobs if n in wave))
        return summary(time.perf_counter() - started, results)

    async def one(prompt, lora):
        started, tokens = time.perf_counter(), 0
        async for out in engine.generate(prompt, sampling, uuid.uuid4().hex, lora, stream=False):
            tokens += len(out.outputs[0].token_ids)
        return time.perf_counter() - started, tokens

    def medians(runs: list[dict]) -> dict:
        return {key: statistics.median(r[key] for r in runs) for key in runs[0]}

    def median_run(run) -> dict:
        return medians([run() for _ in range(args.repeats)])

    payload: dict = {
        "max_loras": args.max_loras,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "isolation_mode": engine.isolation,
        "workloads": {},
    }
    rows, bounds = [], []
    try:
        # warm-up: every adapter downloaded and seen once, full-size batches (first batches compile)
        inference.run(direct([("warm", n) for names in WORKLOADS.values() for n in names]))
        inference.run(direct([(PROMPTS[i % len(PROMPTS)], "") for i in range(args.requests)]))
        for label, names in WORKLOADS.items():
            jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)]) for i in range(args.requests)]
            # Engine and service runs alternate, so drift on a busy machine hits both alike.
            engine_runs, service_runs, wave_runs = [], [], []
            for _ in range(args.repeats):
                engine_runs.append(inference.run(direct(jobs)))
                service_runs.append(via_service(inference.address, jobs, args.max_tokens))
                if len(names) > args.max_loras:
                    wave_runs.append(inference.run(in_waves(jobs)))
            engine_run, service_run = medians(engine_runs), medians(service_runs)
            ratio = service_run["tok_s"] / engine_run["tok_s"]
            payload["workloads"][label] = {
                "engine_tok_s": engine_run["tok_s"],
                "service_tok_s": service_run["tok_s"],
                "ratio": ratio,
                "engine_p50_ms": engine_run["p50_ms"],
                "engine_p95_ms": engine_run["p95_ms"],
                "service_p50_ms": service_run["p50_ms"],
                "service_p95_ms": service_run["p95_ms"],
                "client_cpu_ms": service_run["client_cpu_s"] * 1e3,
            }
            if wave_runs:
                waves = medians(wave_runs)["tok_s"]
                payload["workloads"][label]["engine_in_waves_tok_s"] = waves
                payload["workloads"][label]["waves_ratio"] = waves / engine_run["tok_s"]
                bounds.append(
                    f"{label}: the engine fed in perfect waves of {args.max_loras} adapters: {waves:,.0f} tok/s, "
                    f"{waves / engine_run['tok_s']:.2f}x its own FIFO (the most any admission order can add here)"
                )
            target = TARGETS.get(label)
            rows.append(
                [
                    label,
                    f"{engine_run['tok_s']:,.0f}",
                    f"{service_run['tok_s']:,.0f}",
                    f"{ratio:.2f}x" + (f" ({'met' if ratio >= target else 'NOT met'}: >= {target}x)" if target else ""),
                    f"{engine_run['p50_ms']:.0f} / {engine_run['p95_ms']:.0f}",
                    f"{service_run['p50_ms']:.0f} / {service_run['p95_ms']:.0f}",
                ]
            )
        base_jobs = [(PROMPTS[i % len(PROMPTS)], "") for i in range(args.requests)]
        payload["base_guard_off_tok_s"] = payload["workloads"]["base"]["engine_tok_s"]
        payload["base_null_adapter_tok_s"] = median_run(lambda: inference.run(direct(base_jobs, null)))["tok_s"]
    finally:
        inference.stop()
        registry.stop()
        engine.shutdown()
    print_table(
        f"Adapters per request on one vLLM CPU engine: {args.requests} concurrent requests x {args.max_tokens} "
        f"tokens, max_loras={args.max_loras}, isolation {payload['isolation_mode']} (median of {args.repeats})",
        ["workload", "engine tok/s", "service tok/s", "service/engine", "engine p50/p95 ms", "service p50/p95 ms"],
        rows,
    )
    print(
        f"\nbase traffic, no guard: {payload['base_guard_off_tok_s']:,.0f} tok/s; through the all-zero adapter "
        f"(the old guard): {payload['base_null_adapter_tok_s']:,.0f} tok/s"
    )
    for line in bounds:
        print(line)
    write_json("inference_adapters", payload)


if __name__ == "__main__":
    main()
