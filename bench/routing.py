"""Serving many adapters on two replicas: adapter-affinity routing (HAProxy) vs round robin, in one run.

    .venv/bin/python -m bench.routing [--requests 192] [--concurrency 32] [--max-tokens 32] [--repeats 2]

Two `services.inference` replicas (vLLM CPU engines, `max_loras=2` each) serve the tiny model and
12 adapters from one registry; HAProxy with deploy/haproxy/haproxy.cfg sits in front (the
LocalFleet the routing tests use). The same shuffled request mix (12 adapters, equally popular,
plus a quarter of base-model requests) is sent, `--concurrency` at a time:
- affinity: through HAProxy, the SDK sending `x-tunedock-adapter` (consistent hash, bounded load);
- round_robin: straight to both replicas with the SDK's client-side round robin (what the
  headless Service gives without the proxy).
Before each run every adapter is unloaded from both replicas, so each run starts cold and pays
its own loads; runs alternate (affinity, round robin, round robin, affinity, ...) so drift on a
busy machine hits both alike. Adapter loads are the replicas' own count of first requests on an
adapter (`tunedock_adapter_load_seconds_count`), summed over both.

Prints a table and writes bench/results/routing.json:
  {"affinity": {"tok_s", "adapter_loads", "p95_ms", "p50_ms"}, "round_robin": {...},
   "speedup", "distinct_adapters", ...}
Targets: affinity >= 1.3x round robin's tokens/s; affinity's loads <= 1.2x the distinct adapters.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench._common import print_table, start_service, write_json
from bench.inference_adapters import PROMPTS, make_adapters, percentile

ADAPTERS = [f"route-bench-{i}" for i in range(12)]
SPEEDUP_TARGET = 1.3
LOADS_TARGET = 1.2


def request_mix(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, adapter) pairs: every adapter equally often, a quarter base requests, shuffled."""
    names = ADAPTERS * 3 + [""] * 12  # 36 adapter slots : 12 base
    rng = random.Random(seed)
    mix = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)]) for i in range(count)]
    rng.shuffle(mix)
    return mix


def loads(fleet) -> float:
    return sum(fleet.value(r.index, "tunedock_adapter_load_seconds_count") for r in fleet.members)


def unload_all(fleet) -> None:
    from tunedock.client import InferenceClient

    for replica in fleet.members:
        with InferenceClient(replica.address) as client:
            for adapter in client.loaded():
                client.unload(f"{adapter.name}:{adapter.version}")


def run(fleet, target: str, mix: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    from tunedock.client import InferenceClient

    unload_all(fleet)
    loads_before = loads(fleet)
    with InferenceClient(target, timeout=600) as client:

        def one(job: tuple[str, str]) -> tuple[float, int]:
            prompt, adapter = job
            started = time.perf_counter()
            reply = client.generate(prompt, adapter, max_tokens=max_tokens)
            return time.perf_counter() - started, len(reply.completions[0].token_ids)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, [(PROMPTS[0], "")] * concurrency))  # connections and threads up
            started = time.perf_counter()
            results = list(pool.map(one, mix))
            wall = time.perf_counter() - started
    latencies = [r[0] * 1e3 for r in results]
    return {
        "tok_s": sum(r[1] for r in results) / wall,
        "adapter_loads": loads(fleet) - loads_before,
        "p50_ms": statistics.median(latencies),
        "p95_ms": percentile(latencies, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the fleet is test support, not shipped
    from tests.support.local_fleet import LocalFleet
    from tunedock.client import RegistryClient
    from tunedock.tiny_model import build_tiny_model

    base = build_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    registry, registry_address = start_service("adapter_registry", work / "registry")
    fleet = LocalFleet(
        work / "fleet",
        str(base),
        registry_address,
        replica_args=["--max-loras", "2", "--max-cpu-loras", "16", "--max-lora-rank", "16", "--max-model-len", "512"],
        env={"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]},
    )
    try:
        with RegistryClient(registry_address) as client:
            for name, directory in zip(ADAPTERS, make_adapters(base, work / "adapters", len(ADAPTERS)), strict=True):
                client.publish_dir(directory, name)
        fleet.start()
        fleet.wait_ready(timeout=600)
        round_robin_target = "ipv4:" + ",".join(r.address for r in fleet.members)
        targets = {"affinity": fleet.proxy_address, "round_robin": round_robin_target}
        mix = request_mix(args.requests)
        run(fleet, fleet.proxy_address, mix[:64], args.concurrency, args.max_tokens)  # first batches compile
        runs: dict[str, list[dict]] = {"affinity": [], "round_robin": []}
        for repeat in range(args.repeats):
            order = ["affinity", "round_robin"] if repeat % 2 == 0 else ["round_robin", "affinity"]
            for label in order:
                runs[label].append(run(fleet, targets[label], mix, args.concurrency, args.max_tokens))
                print(f"{label} run {repeat + 1}: {runs[label][-1]}", flush=True)
    finally:
        fleet.stop()
        registry.terminate()
        registry.wait(30)

    results = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
    speedup = results["affinity"]["tok_s"] / results["round_robin"]["tok_s"]
    load_ratio = results["affinity"]["adapter_loads"] / len(ADAPTERS)
    rows = [
        [
            label,
            f"{r['tok_s']:,.0f}",
            f"{r['adapter_loads']:.0f} ({r['adapter_loads'] / len(ADAPTERS):.2f}x distinct)",
            f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f}",
        ]
        for label, r in results.items()
    ]
    print_table(
        f"{args.requests} requests ({len(ADAPTERS)} adapters + base), {args.concurrency} at a time x "
        f"{args.max_tokens} tokens, 2 replicas with max_loras=2 (median of {args.repeats})",
        ["routing", "tok/s", "adapter loads", "p50 / p95 ms"],
        rows,
    )
    print(
        f"\naffinity / round robin: {speedup:.2f}x tok/s ({'met' if speedup >= SPEEDUP_TARGET else 'NOT met'}: "
        f">= {SPEEDUP_TARGET}x); affinity loads {load_ratio:.2f}x the distinct adapters "
        f"({'met' if load_ratio <= LOADS_TARGET else 'NOT met'}: <= {LOADS_TARGET}x)"
    )
    write_json(
        "routing",
        {
            **results,
            "speedup": speedup,
            "distinct_adapters": len(ADAPTERS),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "max_loras": 2,
            "repeats": args.repeats,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
