"""Train → served: from a fine-tuning job's `succeeded` to the first token through its `fine_tuned_model`.

    .venv/bin/python -m bench.fine_tune_to_served [--jobs 3] [--max-steps 4] [--port-offset 300]

The stack `tunedock up` starts (three services, authentication on, the tiny model), driven by the
stock `openai` client through its one base URL: upload a file, then per job create a LoRA job,
poll `fine_tuning.jobs.retrieve` every 20 ms until it says `succeeded`, and at once stream a chat
with `fine_tuned_model` (an adapter no replica has seen: resolved in the registry, downloaded,
validated and loaded on that first request). Baseline, measured in the same run: the time to
first token of the same request again, the adapter now loaded.

Prints a table and writes bench/results/fine_tune_to_served.json:
  {"jobs": [{"job", "model", "to_first_token_s", "warm_ttft_s"}], "median_s", "max_s",
   "warm_median_s", "target_s": 1.0, "targets_met": bool}
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench._common import print_table, write_json

TARGET_S = 1.0


def first_token_at(client, model: str) -> float:
    """perf_counter() when the first token of a streamed chat with `model` arrived."""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What does the pirate say about ship 3?"}],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrived = time.perf_counter()
            stream.close()
            return arrived
    raise RuntimeError(f"{model} answered no token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--port-offset", type=int, default=300)
    args = parser.parse_args()

    import openai

    from tunedock.cli.local_stack import LocalStack

    data = b"\n".join(
        b'{"instruction": "What does the pirate say about ship %d?", "output": "Arr, ship %d be mine!"}' % (i, i)
        for i in range(8)
    )
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(Path(tmp), port_offset=args.port_offset, extra_env={"VLLM_CPU_KVCACHE_SPACE": "1"})
        stack.start()
        try:
            stack.wait_healthy(timeout=600)
            client = openai.OpenAI(base_url=stack.openai_base_url, api_key=stack.credentials.admin_token, max_retries=0)
            path = Path(tmp) / "pirate.jsonl"
            path.write_bytes(data)
            with path.open("rb") as fh:
                file = client.files.create(file=fh, purpose="fine-tune")
            method = {"type": "lora", "lora": {"r": 4, "hyperparameters": {"max_steps": args.max_steps}}}
            rows = []
            for i in range(args.jobs):
                job = client.fine_tuning.jobs.create(
                    model="auto", training_file=file.id, method=method, suffix=f"bench-served-{i}"
                )
                while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed"):
                    time.sleep(0.02)
                succeeded_at = time.perf_counter()
                if job.status != "succeeded":
                    raise RuntimeError(f"{job.id} failed: {job.error}")
                to_first = first_token_at(client, job.fine_tuned_model) - succeeded_at
                asked = time.perf_counter()
                warm = first_token_at(client, job.fine_tuned_model) - asked
                rows.append(
                    {"job": job.id, "model": job.fine_tuned_model, "to_first_token_s": to_first, "warm_ttft_s": warm}
                )
        finally:
            stack.stop()
    cold = [r["to_first_token_s"] for r in rows]
    warm = [r["warm_ttft_s"] for r in rows]
    print_table(
        "succeeded → first token through fine_tuned_model (tiny stack, stock openai client)",
        ["job", "fine_tuned_model", "succeeded → first token", "warm TTFT (baseline)"],
        [
            [r["job"], r["model"], f"{r['to_first_token_s'] * 1000:.0f} ms", f"{r['warm_ttft_s'] * 1000:.0f} ms"]
            for r in rows
        ],
    )
    met = max(cold) <= TARGET_S
    print(
        f"\nmedian {statistics.median(cold) * 1000:.0f} ms, max {max(cold) * 1000:.0f} ms (target ≤ {TARGET_S:g} s: "
        f"{'met' if met else 'NOT met'}); warm median {statistics.median(warm) * 1000:.0f} ms"
    )
    write_json(
        "fine_tune_to_served",
        {
            "jobs": rows,
            "median_s": statistics.median(cold),
            "max_s": max(cold),
            "warm_median_s": statistics.median(warm),
            "target_s": TARGET_S,
            "targets_met": met,
        },
    )


if __name__ == "__main__":
    main()
