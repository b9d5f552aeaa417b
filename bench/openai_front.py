"""The OpenAI-compatible front vs TuneDock's gRPC front vs vLLM's own OpenAI server, same engine, one run.

    .venv/bin/python -m bench.openai_front [--requests 32] [--max-tokens 32] [--max-loras 4] [--repeats 3]

One engine configuration (the tiny model, float32, `max_loras`, max_model_len 512, 1 GiB KV
cache) behind three fronts, one server at a time (the machine has two cores): TuneDock's
inference service over HTTP (/v1/chat/completions) and over gRPC (GenerateUnary with the same
messages), then `vllm serve --enable-lora` with the same adapters as `--lora-modules` and
TuneDock's vLLM plugin disabled. The client runs in its own process and sends every request of a
workload at once (one asyncio thread; httpx for HTTP, grpc.aio for gRPC); a quiet second
separates runs (vLLM's CPU workers spin for about a second after each batch). Workloads: base,
one adapter, 4 adapters mixed, 16 adapters through `max_loras` slots; time to first token over
`--requests` concurrent streams of the mixed workload; and, per server, whether each mixed-batch
output (base and adapters together) equals the same request's solo output (isolation).

Prints tok/s (median of `--repeats`) and writes bench/results/openai_front.json:
  {"workloads": {name: {"openai_tok_s", "grpc_tok_s", "vllm_tok_s", "vs_vllm", "vs_grpc", ...}},
   "ttft_p50_ms": {"openai", "vllm"}, "isolation": {"tunedock", "vllm"}, "targets_met": bool}
Targets: openai/vllm >= 1.0 on every workload, openai/grpc >= 0.95, TTFT p50 <= vllm's.
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
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench._common import ROOT, print_table, write_json
from bench.inference_adapters import PROMPTS, make_adapters, percentile

WORKLOADS = ("base", "one_adapter", "mixed_4", "swap_16")


def workload(name: str, base_id: str, requests: int) -> list[tuple[str, str]]:
    """(prompt, model) per request; model is the base's id or an adapter's name."""
    models = {
        "base": [base_id],
        "one_adapter": ["bench-0"],
        "mixed_4": [f"bench-{i}" for i in range(4)],
        "swap_16": [f"bench-{i}" for i in range(16)],
        "isolation": [base_id, "bench-0", "bench-1", "bench-2"],
    }[name]
    return [(PROMPTS[i % len(PROMPTS)], models[i % len(models)]) for i in range(requests)]


# ---------------------------------------------------------------------------------- client


def client_main(kind: str, target: str, jobs_json: str, max_tokens: int, mode: str) -> None:
    """In its own process: fire every job at once; print RESULT {wall, results: [(latency, tokens, ttft, text)]}.

    mode "batch": all at once; "solo": one after another (the isolation reference); "stream": all at
    once, streamed, timing the first content chunk.
    """
    jobs = [tuple(j) for j in json.loads(jobs_json)]

    async def http_one(client, prompt: str, model: str, stream: bool):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        started = time.perf_counter()
        if not stream:
            reply = (await client.post("/chat/completions", json=body)).json()
            text = reply["choices"][0]["message"]["content"]
            return time.perf_counter() - started, reply["usage"]["completion_tokens"], 0.0, text
        body["stream_options"] = {"include_usage": True}
        first, parts, tokens = None, [], 0
        async with client.stream("POST", "/chat/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        first = first if first is not None else time.perf_counter() - started
                        parts.append(choice["delta"]["content"])
        return time.perf_counter() - started, tokens, first or 0.0, "".join(parts)

    async def grpc_one(stub, pb, prompt: str, model: str):
        adapter = "" if not model.startswith("bench-") else model
        params = pb.GenerateParams(adapter=adapter, sampling=pb.SamplingParams(max_tokens=max_tokens))
        params.messages.messages.append(pb.ChatMessage(role="user", content=prompt))
        started = time.perf_counter()
        reply = await stub.GenerateUnary(pb.GenerateUnaryRequest(params=params), timeout=600)
        c = reply.completions[0]
        return time.perf_counter() - started, len(c.token_ids), 0.0, c.text

    async def run() -> dict:
        if kind == "http":
            import httpx

            limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
            async with httpx.AsyncClient(base_url=target, timeout=600, limits=limits) as client:

                def one(j):
                    return http_one(client, j[0], j[1], mode == "stream")

                return await measure(one)
        import grpc

        from tunedock.v1 import inference_pb2 as pb
        from tunedock.v1 import inference_pb2_grpc

        async with grpc.aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            return await measure(lambda j: grpc_one(stub, pb, j[0], j[1]))

    async def measure(one) -> dict:
        await asyncio.gather(*(one(j) for j in jobs[:4]))  # connections warm
        started = time.perf_counter()
        if mode == "solo":
            results = [await one(j) for j in jobs]
        else:
            results = await asyncio.gather(*(one(j) for j in jobs))
        return {"wall": time.perf_counter() - started, "results": results}

    print("RESULT " + json.dumps(asyncio.run(run())), flush=True)


def drive(kind: str, target: str, jobs, max_tokens: int, mode: str = "batch") -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.openai_front",
        "--client",
        kind,
        target,
        json.dumps(jobs),
        str(max_tokens),
        mode,
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=900).stdout
    data = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    time.sleep(1.0)  # the quiet gap: vLLM's CPU workers spin for about a second after a batch
    results = data["results"]
    return {
        "tok_s": sum(r[1] for r in results) / data["wall"],
        "p50_ms": statistics.median(r[0] * 1e3 for r in results),
        "p95_ms": percentile([r[0] * 1e3 for r in results], 0.95),
        "ttft_p50_ms": statistics.median(r[2] * 1e3 for r in results),
        "texts": [r[3] for r in results],
    }


# --------------------------------------------------------------------------------- servers


def start_tunedock(work: Path, base: Path, adapters: list[Path], max_loras: int) -> tuple[list, str, str, str]:
    """Registry + inference (gRPC and HTTP) as subprocesses; returns (procs, grpc address, base URL, base id)."""
    from bench._common import start_service
    from tunedock.client import RegistryClient

    registry, registry_address = start_service("adapter_registry", work / "registry")
    log_path = (work / "inference").with_suffix(".log")
    (work / "inference").mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "services.inference", "--port", "0", "--metrics-port", "-1", "--http-port", "0",
        "--data-dir", str(work / "inference"), "--base-model", str(base), "--registry-address", registry_address,
        "--max-loras", str(max_loras), "--max-cpu-loras", "16", "--max-lora-rank", "8", "--max-model-len", "512",
        "--dtype", "float32", "--kv-cache-gib", "1",
    ]  # fmt: skip
    with log_path.open("w") as log:
        inference = subprocess.Popen(args, cwd=ROOT, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and inference.poll() is None:
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("http_port"):
                grpc_address = f"127.0.0.1:{record['grpc_port']}"
                url = f"http://127.0.0.1:{record['http_port']}/v1"
                with RegistryClient(registry_address) as client:
                    for i, path in enumerate(adapters):
                        client.publish_dir(path, f"bench-{i}")
                return [inference, registry], grpc_address, url, base.name
        time.sleep(0.2)
    inference.kill()
    registry.kill()
    raise RuntimeError(f"inference did not start:\n{log_path.read_text()[-3000:]}")


def start_vllm(work: Path, base: Path, adapters: list[Path], max_loras: int) -> tuple[subprocess.Popen, str, str]:
    """`vllm serve` (vLLM's own OpenAI server), the same engine settings, TuneDock's plugin off."""
    import socket

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    modules = [f"bench-{i}={path}" for i, path in enumerate(adapters)]
    args = [  # `vllm serve` is this module's main (the `vllm` script looks up a distribution named vllm, not vllm-cpu)
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--port", str(port),
        "--host", "127.0.0.1",
        "--served-model-name", base.name, "--enable-lora", "--max-loras", str(max_loras), "--max-cpu-loras", "16",
        "--max-lora-rank", "8", "--max-model-len", "512", "--dtype", "float32", "--disable-log-stats",
        "--disable-uvicorn-access-log", "--lora-modules", *modules,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_PLUGINS": "none", "TUNEDOCK_VLLM_PLUGIN": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = (work / "vllm.log").open("w")
    proc = subprocess.Popen(args, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, f"{url}/v1", base.name
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"vllm serve did not start:\n{(work / 'vllm.log').read_text()[-3000:]}")


def stop(procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------ main


def measure_server(fronts: dict[str, tuple[str, str]], base_id: str, args) -> dict:
    """{front: {workload: [runs]}, front + "_ttft": [...], front + "_isolation": bool} for one server."""
    out: dict = {}
    for kind, target in fronts.values():
        for name in WORKLOADS:
            drive(kind, target, workload(name, base_id, args.requests), args.max_tokens)  # warm: adapters loaded
    for _ in range(args.repeats):
        for name in WORKLOADS:
            for front, (kind, target) in fronts.items():  # alternate fronts within a repeat
                run = drive(kind, target, workload(name, base_id, args.requests), args.max_tokens)
                out.setdefault(front, {}).setdefault(name, []).append(run)
    for front, (kind, target) in fronts.items():
        if kind != "http":
            continue
        jobs = workload("mixed_4", base_id, args.requests)
        out[f"{front}_ttft"] = [drive(kind, target, jobs, args.max_tokens, "stream") for _ in range(args.repeats)]
        jobs = workload("isolation", base_id, 8)
        mixed = drive(kind, target, jobs, args.max_tokens)["texts"]
        solo = drive(kind, target, jobs, args.max_tokens, "solo")["texts"]
        out[f"{front}_isolation"] = mixed == solo
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tunedock.tiny_model import build_tiny_model

    base = build_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="bench-openai-"))
    adapters = make_adapters(base, work / "adapters", 16)

    procs, grpc_address, url, base_id = start_tunedock(work / "tunedock", base, adapters, args.max_loras)
    try:
        ours = measure_server({"openai": ("http", url), "grpc": ("grpc", grpc_address)}, base_id, args)
    finally:
        stop(procs)
    time.sleep(2)
    proc, vllm_url, vllm_base = start_vllm(work, base, adapters, args.max_loras)
    try:
        theirs = measure_server({"vllm": ("http", vllm_url)}, vllm_base, args)
    finally:
        stop([proc])

    def median(runs: list[dict], key: str = "tok_s") -> float:
        return statistics.median(r[key] for r in runs)

    workloads = {}
    for name in WORKLOADS:
        o, g, v = (median(ours["openai"][name]), median(ours["grpc"][name]), median(theirs["vllm"][name]))
        workloads[name] = {
            "openai_tok_s": round(o, 1),
            "grpc_tok_s": round(g, 1),
            "vllm_tok_s": round(v, 1),
            "vs_vllm": round(o / v, 3),
            "vs_grpc": round(o / g, 3),
            "openai_p95_ms": round(median(ours["openai"][name], "p95_ms"), 1),
            "vllm_p95_ms": round(median(theirs["vllm"][name], "p95_ms"), 1),
        }
    ttft = {"openai": median(ours["openai_ttft"], "ttft_p50_ms"), "vllm": median(theirs["vllm_ttft"], "ttft_p50_ms")}
    isolation = {"tunedock": ours["openai_isolation"], "vllm": theirs["vllm_isolation"]}
    met = (
        all(w["vs_vllm"] >= 1.0 and w["vs_grpc"] >= 0.95 for w in workloads.values()) and ttft["openai"] <= ttft["vllm"]
    )
    rows = [
        [n, w["openai_tok_s"], w["grpc_tok_s"], w["vllm_tok_s"], f"{w['vs_vllm']:.2f}x", f"{w['vs_grpc']:.2f}x"]
        for n, w in workloads.items()
    ]
    print_table(
        f"{args.requests} concurrent x {args.max_tokens} tokens, max_loras={args.max_loras}, median of {args.repeats}",
        ["workload", "OpenAI front tok/s", "gRPC front tok/s", "vllm serve tok/s", "vs vllm", "vs gRPC"],
        rows,
    )
    print(
        f"TTFT p50 over {args.requests} streams: OpenAI front {ttft['openai']:.0f} ms, vllm serve {ttft['vllm']:.0f} ms"
    )
    print(f"mixed batches equal solo outputs: TuneDock {isolation['tunedock']}, vllm serve {isolation['vllm']}")
    print(f"targets met: {met}")
    write_json(
        "openai_front",
        {
            "settings": vars(args),
            "workloads": workloads,
            "ttft_p50_ms": {k: round(v, 1) for k, v in ttft.items()},
            "isolation": isolation,
            "targets_met": met,
        },
    )


if __name__ == "__main__":
    main()
