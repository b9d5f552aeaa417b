"""Large datasets: upload, validation memory, and a job's time to its first step, cold and cached.

    .venv/bin/python -m bench.datasets [--records 10000 100000] [--steps 20]

For each size, an alpaca JSONL of synthetic records (lengths shaped like alpaca's) is written, then:
- upload: the SDK sends it to a `services.trainer` process; MB/s, and the trainer's peak RSS
  while it validates above its idle RSS (VmHWM - VmRSS before, from /proc);
- cold: a LoRA job of `--steps` steps on the tiny model; seconds from submit to the first
  progress event (log_every_steps 1), and the worker's peak RSS;
- cached: the same job again (the dataset on the node, its first window in the token cache);
- baseline, measured in the same run on the same file and tokenizer: `datasets.load_dataset("json")`
  + `map(tokenize)` with the chat template, in its own process (what a script on `datasets` waits
  for before its first step), wall time and peak RSS.

Prints a table and writes bench/results/datasets.json. Targets (issue #26): first step within 30 s
of submit on 1M records, the worker within 1.5 GB, a second job within 10 s; the trainer within
500 MiB above idle while validating.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._common import print_table, start_service, write_json

FIRST_STEP_TARGET_S = 30.0
CACHED_TARGET_S = 10.0
WORKER_RSS_TARGET = 1.5e9
TRAINER_RSS_TARGET = 500 * 2**20
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
]


def write_alpaca(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(mean: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(mean, 0.6)))))

    with path.open("w") as out:
        for i in range(n):
            record = {"instruction": f"{i}: {text(2.5)}", "input": text(1.5) if i % 3 == 0 else "", "output": text(3.5)}
            out.write(json.dumps(record) + "\n")


def status(pid: int, field: str) -> int:
    """VmRSS / VmHWM of a process, in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class WorkerPeak(threading.Thread):
    """The largest VmHWM seen among the trainer's worker processes while the thread runs."""

    def __init__(self, trainer_pid: int) -> None:
        super().__init__(daemon=True)
        self.trainer_pid, self.peak, self.stopped = trainer_pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            for child in Path(f"/proc/{self.trainer_pid}/task").glob("*/children"):
                for pid in child.read_text().split():
                    self.peak = max(self.peak, status(int(pid), "VmHWM"))


def first_step_s(client, spec) -> float:
    from tunedock.v1 import trainer_pb2 as pb

    started = time.monotonic()
    job = client.submit(spec)
    for event in client.watch(job.id, timeout=3600):
        if event.HasField("progress"):
            elapsed = time.monotonic() - started
            break
        if event.HasField("state") and event.state.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            raise RuntimeError(f"the job ended: {client.get(job.id).error}")
    done = client.wait(job.id, timeout=3600)
    if done.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(done.error)
    return elapsed


BASELINE = r"""
import json, resource, sys, time
started = time.monotonic()
import datasets
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
def tokenize(r):
    user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
    return {"input_ids": tok.apply_chat_template(messages, tokenize=True, return_dict=False)}
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])
ds = ds.map(tokenize, remove_columns=ds.column_names)
print(json.dumps({"s": time.monotonic() - started, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def baseline(path: Path, tokenizer_dir: str, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", BASELINE, str(path), tokenizer_dir, str(cache)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from tunedock.client import TrainerClient
    from tunedock.tiny_model import build_tiny_model
    from tunedock.v1 import common_pb2
    from tunedock.v1 import trainer_pb2 as pb

    home = Path(tempfile.mkdtemp(prefix="bench-datasets-"))
    base = str(build_tiny_model(cache_dir=home / "models"))
    registry, registry_address = start_service("adapter_registry", home / "registry")
    trainer, address = start_service(
        "trainer", home / "trainer", "--registry-address", registry_address, "--max-dataset-mb", "4096"
    )
    rows, results = [], {}
    try:
        with TrainerClient(address, timeout=600) as client:
            for n in args.records:
                path = home / f"alpaca-{n}.jsonl"
                write_alpaca(path, n)
                mb = path.stat().st_size / 1e6
                idle = status(trainer.pid, "VmRSS")
                started = time.monotonic()
                dataset = client.upload_dataset(path)
                upload_s = time.monotonic() - started
                validating = status(trainer.pid, "VmHWM") - idle
                spec = pb.JobSpec(
                    base_model=base,
                    method=common_pb2.MethodConfig(lora=common_pb2.LoraConfig(r=8)),
                    train_dataset_ids=[dataset.id],
                    output_name=f"bench-data-{n}",
                    hyperparameters=pb.Hyperparameters(
                        max_steps=args.steps, batch_size=4, log_every_steps=1, learning_rate=1e-3
                    ),
                )
                peak = WorkerPeak(trainer.pid)
                peak.start()
                cold = first_step_s(client, spec)
                cached = first_step_s(client, spec)
                peak.stopped.set()
                peak.join()
                base_run = baseline(path, base, home / f"hf-cache-{n}")
                results[str(n)] = {
                    "megabytes": mb,
                    "upload_mb_s": mb / upload_s,
                    "trainer_rss_above_idle_bytes": validating,
                    "first_step_cold_s": cold,
                    "first_step_cached_s": cached,
                    "worker_peak_rss_bytes": peak.peak,
                    "baseline_load_and_tokenize_s": base_run["s"],
                    "baseline_peak_rss_bytes": base_run["rss"],
                }
                rows.append(
                    [
                        f"{n:,}",
                        f"{mb:.0f}",
                        f"{mb / upload_s:.1f}",
                        f"{validating / 2**20:.0f}",
                        f"{cold:.1f}",
                        f"{cached:.1f}",
                        f"{peak.peak / 2**20:.0f}",
                        f"{base_run['s']:.1f}",
                        f"{base_run['rss'] / 2**20:.0f}",
                    ]
                )
    finally:
        for proc in (trainer, registry):
            proc.terminate()
            proc.wait(30)
    print_table(
        f"Datasets: upload and time to the first step ({args.steps}-step LoRA job, tiny model)",
        [
            "records",
            "MB",
            "upload MB/s",
            "trainer MiB above idle",
            "first step cold s",
            "cached s",
            "worker peak MiB",
            "baseline: datasets load+map s",
            "baseline MiB",
        ],
        rows,
    )
    largest = results[str(max(args.records))]
    targets = {
        "first_step_s": FIRST_STEP_TARGET_S,
        "cached_s": CACHED_TARGET_S,
        "worker_rss_bytes": WORKER_RSS_TARGET,
        "trainer_rss_above_idle_bytes": TRAINER_RSS_TARGET,
    }
    met = {
        "first_step": largest["first_step_cold_s"] <= FIRST_STEP_TARGET_S,
        "cached": largest["first_step_cached_s"] <= CACHED_TARGET_S,
        "worker_rss": largest["worker_peak_rss_bytes"] <= WORKER_RSS_TARGET,
        "trainer_rss": largest["trainer_rss_above_idle_bytes"] <= TRAINER_RSS_TARGET,
    }
    print(f"\ntargets on {max(args.records):,} records: {met}")
    write_json("datasets", {"steps": args.steps, "results": results, "targets": targets, "met": met})


if __name__ == "__main__":
    main()
