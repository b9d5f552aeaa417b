"""The `tunedock` CLI driven as a user would: subprocesses against real services.

The registry and inference service are the session's (one vLLM engine per session); a trainer
runs beside them. Addresses reach the CLI through its environment variables.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tunedock" / "data"


@pytest.fixture(scope="module")
def env(stack_env):
    return stack_env


def tunedock(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunedock.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_upload_train_watch_list_generate(env, tiny_model_dir, tmp_path):
    upload = tunedock(env, "data", "upload", str(DATA / "demo_robot.jsonl"), "--json")
    assert upload.returncode == 0, upload.stderr
    dataset = json.loads(upload.stdout)
    assert dataset["numRecords"] == "12" and dataset["id"].startswith("ds-")
    # A name with brackets, a backslash and markup-like text prints as given, not as rich markup.
    odd = tmp_path / "robot [v2] \\ [bold]x[red].jsonl"
    odd.write_bytes((DATA / "demo_robot.jsonl").read_bytes() + b"\n")  # new bytes: a dataset of its own
    named = tunedock({**env, "COLUMNS": "300"}, "data", "upload", str(odd))
    assert named.returncode == 0 and f"({odd.name})" in named.stdout, named.stdout + named.stderr
    shown = tunedock({**env, "COLUMNS": "300"}, "data", "get", dataset["id"])
    assert shown.returncode == 0, shown.stderr
    assert "alpaca, from jsonl" in shown.stdout and "records     12" in shown.stdout, shown.stdout
    listed = tunedock(env, "data", "ls", "--json")
    assert dataset["id"] in {d["id"] for d in json.loads(listed.stdout)}

    train = tunedock(
        env,
        "train",
        "--method",
        "lora",
        "--base",
        str(tiny_model_dir),
        "--data",
        dataset["id"],
        "--name",
        "cli-robot",
        "--steps",
        "40",
        "--lr",
        "3e-3",
        "--r",
        "8",
        "--watch",
    )
    assert train.returncode == 0, train.stderr
    assert "published cli-robot:1" in train.stdout
    assert "40/40" in train.stderr and "loss" in train.stderr  # the live progress line

    listed = tunedock(env, "adapters", "ls", "--json")
    assert listed.returncode == 0
    assert {"name": "cli-robot", "kind": "ARTIFACT_KIND_LORA_ADAPTER"}.items() <= next(
        a for a in json.loads(listed.stdout) if a["name"] == "cli-robot"
    ).items()

    # By default the prompt goes through the chat template, as the training data did: the adapter answers.
    tuned = tunedock(env, "generate", "--adapter", "cli-robot", "--max-tokens", "12", "Tell me about gold.")
    base = tunedock(env, "generate", "--max-tokens", "12", "Tell me about gold.")
    assert tuned.returncode == base.returncode == 0, tuned.stderr + base.stderr
    assert tuned.stdout.startswith("BEEP BOOP")
    assert tuned.stdout != base.stdout
    # --raw sends the text as is: the same rendered conversation gives the same answer.
    rendered = "<|begin_of_text|><|im_start|>user\nTell me about gold.<|im_end|>\n<|im_start|>assistant\n"
    raw = tunedock(env, "generate", "--raw", "--adapter", "cli-robot", "--max-tokens", "12", rendered)
    assert raw.returncode == 0 and raw.stdout == tuned.stdout

    jobs = json.loads(tunedock(env, "jobs", "ls", "--json").stdout)
    assert jobs[0]["state"] == "JOB_STATE_SUCCEEDED" and jobs[0]["outputRef"] == "cli-robot:1"


def _filler_dataset(path: Path) -> Path:
    """Text records long enough that packed batches are full (batch x seq tokens), as plan assumes."""
    import random

    words = (DATA / "tiny_corpus.txt").read_text().split()
    rng = random.Random(0)
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) for _ in range(48)))
    return path


def test_compare_and_plan_on_the_tiny_model(env, tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    data = _filler_dataset(tmp_path / "filler.jsonl")
    piped = {k: v for k, v in env.items() if k != "COLUMNS"}  # stdout is a pipe, as in `tunedock compare > file`
    result = tunedock(
        piped,
        "compare",
        "--base",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--max-seq-length",
        "256",
        "--memory-budget",
        "4GiB",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "within 4.0 GiB: full, freeze, lora, qlora fit." in result.stdout
    assert "otherwise LoRA, the usual first choice" in result.stdout
    assert "…" not in result.stdout, "a piped table is printed whole, not cut to 80 columns"
    report = json.loads((out / "compare.json").read_text())
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = {r["method"]: r for r in report["methods"]}
    assert set(rows) == {"full", "freeze", "lora", "qlora"}
    tensors = {m: rows[m]["training_memory_bytes"] for m in rows}
    assert tensors["full"] > tensors["freeze"] > tensors["lora"] > tensors["qlora"], tensors
    assert rows["full"]["trainable_params"] > rows["freeze"]["trainable_params"] > rows["lora"]["trainable_params"]
    assert rows["lora"]["artifact_bytes"] < rows["freeze"]["artifact_bytes"] < rows["full"]["artifact_bytes"]
    # Full and Freeze answer per request through adapters extracted from them, on the same engine as LoRA/QLoRA.
    from tunedock.client import RegistryClient

    with RegistryClient(env["TUNEDOCK_REGISTRY_ADDRESS"]) as registry:
        for method in ("full", "freeze"):
            served = registry.get(rows[method]["served"])
            assert served.lineage.extracted_from == rows[method]["output"]
            assert served.lora_rank == rows[method]["extract_rank"] >= 1
            assert 0.0 <= rows[method]["agreement"] <= 1.0 and rows[method]["kl"] >= 0.0
            assert f"extracted r={rows[method]['extract_rank']}" in result.stdout
    assert rows["lora"]["served"] == rows["lora"]["output"]
    for answers in report["answers"].values():
        assert set(answers) == {"base", "full", "freeze", "lora", "qlora"} and all(answers.values())

    plan = tunedock(
        env,
        "plan",
        "--base",
        str(tiny_model_dir),
        "--batch-size",
        "4",
        "--max-seq-length",
        "256",
        "--r",
        "16",
        "--json",
    )
    assert plan.returncode == 0, plan.stderr
    estimates = {m["method"]: m for m in json.loads(plan.stdout)["methods"]}
    for method, row in rows.items():
        # The peak within 25%: the runtime the worker held before loading the model plus the training's
        # tensors at their peak (both measured by the trainer). The process RSS peak is reported too but not
        # compared: glibc arenas and the allocator's caching move it by hundreds of MiB between identical runs.
        estimate = estimates[method]["peak_bytes"]
        measured = row["runtime_memory_bytes"] + row["training_memory_bytes"]
        assert abs(estimate - measured) <= 0.25 * measured, (method, estimate, measured)
        # The training tensors alone: the estimate is an upper bound, and not a loose one.
        tensor_estimate = estimate - estimates[method]["parts"]["runtime"]
        assert row["training_memory_bytes"] <= tensor_estimate <= 1.5 * row["training_memory_bytes"], (
            method,
            tensor_estimate,
            row["training_memory_bytes"],
        )


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["data", "upload", "/no/such/file.jsonl"], "/no/such/file.jsonl does not exist", 2),
        (["train", "--method", "sgd", "--base", "x", "--data", "ds-1"], "unknown method 'sgd'", 2),
        (["generate", "--adapter", "no-such-adapter", "hi"], "adapter 'no-such-adapter'", 4),
        (["plan", "--base", "/nowhere"], "/nowhere is not a model directory", 2),
        # Text in square brackets is printed as sent, not taken for rich markup.
        (["generate", "--adapter", "bad[in=1024, out=512]", "hi"], "'bad[in=1024, out=512]': use 1-128", 1),
        (["generate", "--adapter", "x[/red]\\[bold]", "hi"], "'x[/red]\\\\[bold]'", 1),
    ],
)
def test_bad_input_gives_one_line_and_an_exit_code(env, args, message, code):
    result = tunedock(env, *args)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_services_not_running(env):
    down = {**env, "TUNEDOCK_TRAINER_ADDRESS": "127.0.0.1:1", "TUNEDOCK_REGISTRY_ADDRESS": "127.0.0.1:1"}
    for args in (["jobs", "ls"], ["adapters", "ls"]):
        result = tunedock(down, *args)
        assert result.returncode == 3
        assert result.stderr.strip().splitlines() == [
            "error: cannot reach the TuneDock service; is `tunedock up` running? (addresses: --trainer/--registry/"
            "--inference or TUNEDOCK_TRAINER_ADDRESS etc.)"
        ]


def test_exit_codes_follow_the_error_class(env):
    """The class of the error, not its text, picks the code: nothing listening is Unreachable (3), a
    server's own UNAVAILABLE is Unavailable (3, its message kept), NOT_FOUND 4, UNAUTHENTICATED 5."""
    import grpc

    from tunedock.cli.common import exit_code
    from tunedock.client import RegistryClient
    from tunedock.client.errors import SERVER_ANSWERED, from_rpc_error
    from tunedock.errors import NotFound, Unauthenticated, Unavailable, Unreachable

    with RegistryClient("127.0.0.1:1", timeout=5) as down, pytest.raises(Unreachable) as unreachable:
        down.resolve("anything")
    with RegistryClient(env["TUNEDOCK_REGISTRY_ADDRESS"], timeout=10) as registry, pytest.raises(NotFound) as missing:
        registry.resolve("no-such-artifact")

    class Answered(grpc.RpcError):  # a server's UNAVAILABLE carries the pushback the interceptor sets
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "job store unreachable: sqlite says disk I/O error"

        def trailing_metadata(self):
            return ((SERVER_ANSWERED, "-1"),)

    answered = from_rpc_error(Answered())
    assert type(answered).__mro__[1] is Unavailable and not isinstance(answered, Unreachable)
    assert [exit_code(e) for e in (unreachable.value, answered, missing.value)] == [3, 3, 4]
    assert exit_code(Unauthenticated("x")) == 2  # raised before any call: the input was wrong
    assert exit_code(from_rpc_error(_status_error(grpc.StatusCode.UNAUTHENTICATED))) == 5
    assert exit_code(from_rpc_error(_status_error(grpc.StatusCode.ALREADY_EXISTS))) == 1


def _status_error(status):
    import grpc

    class Failed(grpc.RpcError):
        def code(self):
            return status

        def details(self):
            return status.name

    return Failed()


def test_a_local_stack_refuses_ports_in_use_instead_of_talking_to_whoever_holds_them(tmp_path):
    """A stack left running would answer the health checks in place of the new one (whose servers exit,
    unable to bind): `tunedock up` and the demo refuse to start, naming the ports, and start nothing."""
    import socket

    from tunedock.cli.local_stack import LocalStack

    offset = 2000 + os.getpid() % 500
    stack = LocalStack(tmp_path, port_offset=offset)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 50052 + offset))
        holder.listen()
        with pytest.raises(RuntimeError, match=f"port\\(s\\) {50052 + offset} on 127.0.0.1 are in use"):
            stack.start()
        assert stack.processes == {}
        args = ("--data-dir", str(tmp_path), "--base-model", "/unused", "--port-offset", str(offset))
        for command in ("up", "demo"):
            result = tunedock(dict(os.environ), command, *args, timeout=120)
            assert (
                result.returncode == 1 and f"{50052 + offset} on 127.0.0.1 are in use" in result.stdout + result.stderr
            )
            assert "Traceback" not in result.stderr


@pytest.mark.vllm
@pytest.mark.slow
def test_local_stack_runs_with_one_generated_token(tmp_path, tiny_model_dir):
    """`tunedock up`'s stack: authentication on, the CLI finds the generated admin token in its home."""
    from tunedock.cli.local_stack import LocalStack

    offset = 1000 + os.getpid() % 500
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TUNEDOCK_TOKEN", "TUNEDOCK_TOKEN_FILE")}
    stack = LocalStack(
        tmp_path,
        base_model=str(tiny_model_dir),
        port_offset=offset,
        extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "LD_PRELOAD": ""},
    )
    stack.start()
    try:
        stack.wait_healthy(timeout=300)
        token = stack.credentials.admin_token
        assert token not in stack.credentials.token_file.read_text()  # stored hashed
        registry = stack.address("adapter_registry")
        ok = tunedock({**env, "TUNEDOCK_HOME": str(tmp_path)}, "adapters", "ls", "--registry", registry)
        assert ok.returncode == 0, ok.stderr
        refused = tunedock({**env, "TUNEDOCK_TOKEN": "td_wrong"}, "adapters", "ls", "--registry", registry)
        assert refused.returncode == 5 and "the bearer token is unknown, revoked or expired" in refused.stderr
        anonymous = tunedock(
            {**env, "TUNEDOCK_HOME": str(tmp_path / "elsewhere")}, "jobs", "ls", "--trainer", stack.address("trainer")
        )
        assert anonymous.returncode == 5 and "no credentials" in anonymous.stderr
        import openai  # the OpenAI-compatible API beside gRPC, the admin token as api_key

        with openai.OpenAI(base_url=stack.openai_base_url, api_key=token, max_retries=0) as client:
            assert client.models.list().data[0].id == tiny_model_dir.name
            with pytest.raises(openai.AuthenticationError):
                client.with_options(api_key="td_wrong").models.list()
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), codes


def test_info_says_what_the_stack_serves_and_a_down_service_is_named(env, tiny_model_dir):
    shown = tunedock(env, "info", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["inference"]["base_model"] == info["trainer"]["default_base_model"] == str(tiny_model_dir)
    assert info["inference"]["max_lora_rank"] == info["trainer"]["max_lora_rank"] == 128
    assert info["registry"]["metadata_backend"] == "sqlite" and info["errors"] == {}
    assert info["inference"]["openai_base_url"].endswith("/v1") and info["inference"]["tool_parser"] == "hermes"

    text = tunedock(env, "info")
    assert text.returncode == 0, text.stderr
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.stdout.splitlines() if "  " in line)
    assert rows["default base"] == str(tiny_model_dir) and rows["chat template"] == "yes: send messages"
    assert rows["LoRA"].endswith("rank <= 128") and rows["executor"] == "local (cpu)"
    assert rows["OpenAI API"] == info["inference"]["openai_base_url"] and rows["tool-call parser"] == "hermes"

    down = tunedock({**env, "TUNEDOCK_TRAINER_ADDRESS": "127.0.0.1:1"}, "info")
    assert down.returncode == 0, down.stderr  # the others still answer
    assert "trainer not reachable: 127.0.0.1:1" in down.stdout and "inference" in down.stdout


def test_train_without_a_base_then_extract_the_freeze_result(env, tiny_model_dir):
    data = str(DATA / "demo_robot.jsonl")
    train = tunedock(env, "train", "--method", "freeze", "--layers", "1", "--data", data, "--steps", "8", "--watch")
    assert train.returncode == 0, train.stderr
    name = f"freeze-{tiny_model_dir.name}".lower().replace("_", "-")  # named after the trainer's default base
    assert f"published {name}:1" in train.stdout

    extract = tunedock(env, "extract", f"{name}:1", "--output", "cli-freeze-lora", "--rank", "8", "--watch")
    assert extract.returncode == 0, extract.stderr
    assert "published cli-freeze-lora:1: rank 8, keeps" in extract.stdout

    queued = tunedock(env, "extract", f"{name}:1", "--output", "cli-freeze-lora", "--rank", "4", "--json")
    assert queued.returncode == 0, queued.stderr
    job = json.loads(queued.stdout)
    assert job["spec"]["extract"]["rank"] == 4  # without --watch: the job, as submitted
    assert tunedock(env, "jobs", "cancel", job["id"]).returncode == 0

    refused = tunedock(env, "extract", "no-such-result:1", "--output", "x-lora", "--watch")
    assert refused.returncode == 4 and "no-such-result" in refused.stderr  # not found, one line
