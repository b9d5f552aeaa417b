"""The inference service through a real gRPC server on the session's one vLLM CPU engine."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from tunedock.client import InferenceClient, RegistryClient
from tunedock.errors import ResourceExhausted
from tunedock.v1 import inference_pb2 as pb
from tunedock.v1 import inference_pb2_grpc

PROMPTS = ["What does the pirate say about ship 3?", "Tell me about the moon.", "Two plus two is", "Once upon a time"]


def _train_adapter(base, tmp_path, seed: int, rank: int = 8, targets=("q_proj", "v_proj", "down_proj")):
    """A LoRA adapter for the tiny model with random, non-zero weights (different per seed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False),
    )
    out = tmp_path / f"adapter-{seed}-{rank}"
    model.save_pretrained(out)
    return out


def _peft_greedy(base, adapter_dir, prompt, max_tokens=12) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.input_ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def adapters(inference_stack, tiny_model_dir, tmp_path_factory):
    """Three adapters published to the registry: a, b, c."""
    tmp = tmp_path_factory.mktemp("adapters")
    dirs = {name: _train_adapter(tiny_model_dir, tmp, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    with RegistryClient(inference_stack.registry.address) as registry:
        for name, d in dirs.items():
            registry.publish_dir(d, f"inf-{name}")
    return dirs


@pytest.fixture(scope="module")
def stub(inference_stack):
    channel = grpc.insecure_channel(inference_stack.inference.address)
    yield inference_pb2_grpc.InferenceServiceStub(channel)
    channel.close()


def generate(stub, prompt, adapter="", max_tokens=12, **sampling) -> pb.GenerateUnaryResponse:
    params = pb.GenerateParams(
        prompt=prompt, adapter=adapter, sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling)
    )
    return stub.GenerateUnary(pb.GenerateUnaryRequest(params=params), timeout=120)


def tokens(stub, prompt, adapter="") -> list[int]:
    return list(generate(stub, prompt, adapter).completions[0].token_ids)


def test_adapters_change_output_and_match_engine_and_peft(stub, inference_stack, adapters, tiny_model_dir):
    prompt = PROMPTS[0]
    outputs = {name: tokens(stub, prompt, f"inf-{name}") for name in ("a", "b")}
    base = tokens(stub, prompt)
    assert len({tuple(base), tuple(outputs["a"]), tuple(outputs["b"])}) == 3
    core = inference_stack.inference.server.core

    for name in ("a", "b"):
        reply = generate(stub, prompt, f"inf-{name}")
        assert reply.adapter_version == f"inf-{name}:1"
        with RegistryClient(inference_stack.registry.address) as registry:
            sha = registry.resolve(f"inf-{name}").content_sha256
        direct = inference_stack.engine_tokens(
            prompt, inference_stack.engine.lora_request(f"inf-{name}:1", core.lora_ids(sha), str(adapters[name]))
        )
        assert outputs[name] == direct
        assert outputs[name] == _peft_greedy(tiny_model_dir, adapters[name], prompt)


def test_streaming_deltas_add_up_to_the_unary_text(stub, adapters):
    params = pb.GenerateParams(prompt=PROMPTS[1], adapter="inf-a", sampling=pb.SamplingParams(max_tokens=10))
    messages = list(stub.Generate(pb.GenerateRequest(params=params), timeout=60))
    assert [m.completion_tokens for m in messages] == list(range(1, len(messages) + 1))
    assert messages[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert "".join(m.text_delta for m in messages) == generate(stub, PROMPTS[1], "inf-a", 10).completions[0].text


def test_chat_messages_use_the_chat_template(stub, inference_stack):
    params = pb.GenerateParams(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
        sampling=pb.SamplingParams(max_tokens=5),
    )
    reply = stub.GenerateUnary(pb.GenerateUnaryRequest(params=params), timeout=60)
    rendered = inference_stack.engine.prompt_from_messages([{"role": "user", "content": "hi"}])
    assert reply.prompt_tokens == inference_stack.engine.prompt_tokens(rendered)
    assert rendered.endswith("<|im_start|>assistant\n")


def _concurrent(stub, jobs):
    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(lambda job: tokens(stub, *job), jobs))


@pytest.mark.parametrize(
    "names", [("", "inf-a"), ("", "inf-a", "inf-b", "inf-c")], ids=["slots-free", "every-slot-taken"]
)
def test_concurrent_mixed_batches_equal_solo_outputs(stub, adapters, inference_stack, names):
    """Base requests beside adapters, up to every LoRA slot taken (where vLLM's CPU ops gave base rows the last
    slot's adapter): each of 32 concurrent requests gets exactly its solo output, with no zero-adapter detour."""
    assert inference_stack.engine.isolation == "patched-ops" and not inference_stack.engine.base_takes_a_slot
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)]) for i in range(32)]
    solo = {job: tokens(stub, *job) for job in set(jobs)}
    together = _concurrent(stub, jobs)
    assert [solo[job] for job in jobs] == together
    adapters_used = len([n for n in names if n])
    assert (adapters_used == inference_stack.MAX_LORAS) == (len(names) == 4)
    listing = stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest())
    assert listing.isolation_mode == "patched-ops" and "patched" in listing.isolation_detail


def test_more_adapters_than_slots_are_admitted_adapter_by_adapter(stub, adapters, inference_stack, tmp_path):
    """Seven adapters through three LoRA slots: the engine never holds requests of more than two waves of
    adapters (its three slots and three queued), and every request still gets its solo output."""
    names = ["inf-a", "inf-b", "inf-c"]
    with RegistryClient(inference_stack.registry.address) as registry:
        for seed in (4, 5, 6, 7):
            registry.publish_dir(_train_adapter(tiny_model_dir_of(inference_stack), tmp_path, seed), f"inf-more-{seed}")
            names.append(f"inf-more-{seed}")
    scheduler = inference_stack.inference.server.core.scheduler
    scheduler.peak_active = 0
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)]) for i in range(36)]
    solo = {job: tokens(stub, *job) for job in set(jobs)}
    scheduler.peak_active = 0
    together = _concurrent(stub, jobs)
    assert [solo[job] for job in jobs] == together
    assert scheduler.peak_active == 2 * inference_stack.MAX_LORAS  # two waves admitted, never more
    assert scheduler.queued == 0


def tiny_model_dir_of(stack):
    return stack.engine.base_model


def test_alias_move_switches_what_the_alias_serves(stub, inference_stack, adapters, tmp_path):
    with RegistryClient(inference_stack.registry.address) as registry:
        registry.publish_dir(adapters["a"], "inf-alias")
        second = tmp_path / "second"
        shutil.copytree(adapters["b"], second)
        registry.publish_dir(second, "inf-alias")
        registry.set_alias("inf-alias", "prod", 1)
        first = tokens(stub, PROMPTS[2], "inf-alias@prod")
        assert first == tokens(stub, PROMPTS[2], "inf-a")
        registry.set_alias("inf-alias", "prod", 2)
    moved = time.monotonic()
    while time.monotonic() < moved + 5:
        reply = generate(stub, PROMPTS[2], "inf-alias@prod")
        if reply.adapter_version == "inf-alias:2":
            break
        time.sleep(0.05)
    assert reply.adapter_version == "inf-alias:2"
    assert time.monotonic() - moved < 1.0  # the registry Watch, not the 30 s resolve TTL
    assert list(reply.completions[0].token_ids) == tokens(stub, PROMPTS[2], "inf-b")


def _corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4  # tensor claims more bytes than exist
    encoded = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])
    return dst


def test_incompatible_adapters_are_refused_and_the_engine_keeps_serving(
    stub, inference_stack, adapters, tmp_path, tiny_model_dir
):
    from tunedock.v1 import adapter_registry_pb2 as rpb

    big = _train_adapter(tiny_model_dir, tmp_path, 9, rank=2 * inference_stack.max_lora_rank)
    with RegistryClient(inference_stack.registry.address) as registry:
        registry.publish_dir(big, "inf-rank-too-big")
        registry.publish_dir(
            adapters["a"],
            "inf-otherbase",
            lineage=rpb.Lineage(base_model="meta-llama/Llama-3-8B", base_fingerprint="f" * 64),
        )
        corrupt = _corrupt_copy(adapters["a"], tmp_path / "corrupt")
        with pytest.raises(grpc.RpcError) as info:
            registry.publish_dir(corrupt, "inf-corrupt")  # the registry refuses it outright
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    cases = [
        ("inf-rank-too-big", "rank 256, above this replica's max_lora_rank 128"),
        ("inf-otherbase", "was trained on base 'meta-llama/Llama-3-8B'"),
    ]
    for ref, fragment in cases:
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, PROMPTS[0], ref)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert fragment in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, PROMPTS[0], "inf-nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, PROMPTS[0], "", max_tokens=100000)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in info.value.details()
    for long_prompt in ("word " * 2000, "word " * 500):  # past max_model_len (512): by characters, by tokens
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, long_prompt, "")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "maximum context length is 512 tokens" in info.value.details()
    bad_sampling = [
        ({"n": 2}, "needs temperature > 0"),
        ({"stop": [""]}, "stop strings must not be empty"),
        ({"temperature": 5.0}, "temperature must be in [0, 2]"),
    ]
    for sampling, fragment in bad_sampling:
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, PROMPTS[0], "", **sampling)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    assert tokens(stub, PROMPTS[0], "inf-a") == tokens(stub, PROMPTS[0], "inf-a")  # still serving
    loaded = {a.name for a in stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).adapters}
    assert "inf-rank-too-big" not in loaded and "inf-otherbase" not in loaded
    # inf-otherbase has inf-a's bytes: refusing it must leave the files inf-a serves from (the engine
    # reads them again whenever inf-a comes back into a slot, and dies on a missing adapter).
    entries = inference_stack.inference.server.core.cache.entries.values()
    assert [e.resolved.ref for e in entries if not (e.path / "adapter_model.safetensors").exists()] == []


@pytest.mark.parametrize("hidden", [512, 128], ids=["wider-base", "narrower-base"])
def test_an_adapter_made_for_another_width_is_refused_before_the_engine(
    stub, inference_stack, adapters, tmp_path, hidden
):
    """A plain PEFT adapter (no lineage, so no fingerprint to compare) of a base with another hidden size: a wider
    one crashed vLLM's engine for everyone, a narrower one was served as garbage. Now the module shapes the
    registry recorded are compared with the served base's before a byte is downloaded."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tunedock.tiny_model import TinyModelSpec, build_tiny_model

    other = build_tiny_model(TinyModelSpec(hidden_size=hidden, intermediate_size=2 * hidden), cache_dir=tmp_path)
    adapter = _train_adapter(other, tmp_path, 11)
    name = f"inf-width-{hidden}"
    with RegistryClient(inference_stack.registry.address) as registry:
        published = registry.publish_dir(adapter, name)
    shapes = {m.module: (m.in_features, m.out_features) for m in published.version.module_shapes}
    assert shapes["layers.0.self_attn.q_proj"] == (hidden, hidden)
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, PROMPTS[0], name)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "made for a base of another shape" in info.value.details()
    assert (
        f"layers.0.mlp.down_proj is [in={2 * hidden}, out={hidden}] in the adapter but [in=512, out=256] in the "
        "served base" in info.value.details()
    )
    cached = inference_stack.inference.server.core.cache.root
    assert not (cached / published.version.content_sha256).exists()  # refused before download
    channel = grpc.insecure_channel(inference_stack.inference.address)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    channel.close()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert tokens(stub, PROMPTS[0], "inf-a") == tokens(stub, PROMPTS[0], "inf-a")  # everyone else still served


def test_client_cancellation_aborts_the_engine_request(stub, inference_stack, adapters):
    params = pb.GenerateParams(
        prompt=PROMPTS[3], adapter="inf-a", sampling=pb.SamplingParams(max_tokens=400, stop=["\x00never"])
    )
    stream = stub.Generate(pb.GenerateRequest(params=params), timeout=60)
    next(stream)
    stream.cancel()
    core = inference_stack.inference.server.core
    deadline = time.monotonic() + 10
    while core.metrics.in_flight._value.get() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core.metrics.in_flight._value.get() == 0
    entry = next(a.entry for a in core.loaded() if a.entry.resolved.name == "inf-a")
    assert entry.in_flight == 0
    assert len(tokens(stub, PROMPTS[3], "inf-a")) == 12  # the engine has room for the next request


def test_preload_pin_list_unload(stub, adapters):
    reply = stub.PreloadAdapter(pb.PreloadAdapterRequest(adapters=["inf-c"], pin=True), timeout=60)
    assert reply.adapters[0].pinned and reply.adapters[0].state == pb.ADAPTER_CACHE_STATE_LOADED
    listed = {a.name: a for a in stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).adapters}
    assert listed["inf-c"].pinned and listed["inf-c"].lora_int_id > 0
    assert stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="inf-c")).unloaded
    assert "inf-c" not in {a.name for a in stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).adapters}


def test_registry_down_serves_cached_adapters(stub, inference_stack, adapters, tmp_path):
    """With the registry down, a cached adapter serves at once even after its resolution went stale; a never-seen
    one fails UNAVAILABLE within 2 s at the SDK (no retry multiplies the server's answer); and once the registry
    is back, resolving works again within about a second."""
    from tunedock.client import InferenceClient

    cached = tokens(stub, PROMPTS[0], "inf-b")
    with RegistryClient(inference_stack.registry.address) as registry:
        registry.publish_dir(adapters["c"], "inf-never-used")
    resolver = inference_stack.inference.server.core.resolver
    resolver.ttl_s = 0.0  # every cached resolution is stale from now on
    inference_stack.registry.stop()
    try:
        started = time.monotonic()
        assert tokens(stub, PROMPTS[0], "inf-b") == cached
        assert time.monotonic() - started < 0.5, "a cached adapter waited on the dead registry"
        with InferenceClient(inference_stack.inference.address) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                client.generate(PROMPTS[0], adapter="inf-never-used", max_tokens=4)
            assert time.monotonic() - started < 2.0
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "registry unavailable" in info.value.details()
    finally:
        inference_stack.restart_registry()
        resolver.ttl_s = 30.0
    back = time.monotonic()
    while True:
        try:
            served = tokens(stub, PROMPTS[0], "inf-never-used")
            break
        except grpc.RpcError:
            assert time.monotonic() - back < 3.0, "resolving stayed down after the registry came back"
            time.sleep(0.1)
    assert served == tokens(stub, PROMPTS[0], "inf-c")


def test_server_info_says_what_the_replica_serves(inference_stack, tiny_model_dir):
    from services.common.basemodels import base_fingerprint

    with InferenceClient(inference_stack.inference.address) as client:
        info = client.info()
        isolation = client.stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest(), timeout=10).isolation_mode
    assert info.base_model == str(tiny_model_dir) and info.architecture == "LlamaForCausalLM"
    assert info.base_fingerprint == base_fingerprint(str(tiny_model_dir)) and len(info.base_fingerprint) == 64
    assert (info.dtype, info.device, info.has_chat_template) == ("float32", "cpu", True)
    assert (info.max_loras, info.max_cpu_loras, info.max_lora_rank, info.max_model_len) == (
        inference_stack.MAX_LORAS,
        8,
        inference_stack.max_lora_rank,
        512,
    )
    assert info.isolation_mode == isolation and info.routing_key == "x-tunedock-adapter"
    assert info.max_tokens_limit == 4096 and info.max_prompt_chars == 200_000 and info.version


def test_adapters_whose_ids_fold_together_serve_their_own_weights(stub, inference_stack, adapters):
    """vLLM keys an adapter by its lora_int_id: two contents on one id would serve one's weights for the
    other. In an id space of 2, two of the three adapters' hashes fold onto one id (pigeonhole); each
    must still answer with its own weights."""
    from services.inference.adapters import LoraIds

    core = inference_stack.inference.server.core
    with RegistryClient(inference_stack.registry.address) as registry:
        shas = {n: registry.resolve(f"inf-{n}").content_sha256 for n in "abc"}
    fold = {n: int(sha[:15], 16) % 2 for n, sha in shas.items()}
    pair = next((x, y) for x in "abc" for y in "abc" if x < y and fold[x] == fold[y])
    expected = {n: tokens(stub, PROMPTS[0], f"inf-{n}") for n in pair}
    assert expected[pair[0]] != expected[pair[1]]
    saved, core.lora_ids = core.lora_ids, LoraIds(space=2)
    try:
        got = {n: tokens(stub, PROMPTS[0], f"inf-{n}") for n in pair}
        ids = {n: core.lora_ids(shas[n]) for n in pair}
    finally:
        core.lora_ids = saved
    assert sorted(ids.values()) == [1, 2]
    assert got == expected
    full = LoraIds(space=2)
    first = (full(shas["a"]), full(shas["b"]))
    assert sorted(first) == [1, 2] and (full(shas["a"]), full(shas["b"])) == first  # one id per content, kept
    with pytest.raises(ResourceExhausted, match="adapter ids of this replica are taken"):
        full(shas["c"])


def test_an_eviction_does_not_stall_open_streams(stub, inference_stack, adapters, monkeypatch):
    """Evicting an adapter deletes its files; on a slow disk that must not stop the tokens of the other
    streams open (one event loop sends them all). 31 streams on inf-a run; a 32nd, on inf-b, ends early
    and its release evicts every idle adapter, each deletion made to take 1.5 s here."""
    import services.inference.adapters as cache_module

    real_rmtree = shutil.rmtree
    deleting: list[float] = []

    def slow_rmtree(path, *args, **kwargs):
        deleting.append(time.monotonic())
        time.sleep(1.5)
        real_rmtree(path, *args, **kwargs)

    core = inference_stack.inference.server.core
    tokens(stub, PROMPTS[0], "inf-b")  # cached and checked: its next request acquires it without I/O
    monkeypatch.setattr(cache_module.shutil, "rmtree", slow_rmtree)
    bound = core.cache.max_bytes
    first_tokens = threading.Semaphore(0)

    def stream(adapter: str, max_tokens: int) -> tuple[list[float], int]:
        params = pb.GenerateParams(
            prompt=PROMPTS[1], adapter=adapter, sampling=pb.SamplingParams(max_tokens=max_tokens)
        )
        times, count = [], 0
        for message in stub.Generate(pb.GenerateRequest(params=params), timeout=120):
            times.append(time.monotonic())
            count = message.completion_tokens
            if len(times) == 1:
                first_tokens.release()
        return times, count

    with ThreadPoolExecutor(32) as pool:
        streams = [pool.submit(stream, "inf-a", 128) for _ in range(31)]  # in use: never evicted
        for _ in streams:
            assert first_tokens.acquire(timeout=60)
        core.cache.max_bytes = 1  # every adapter not in use is over the bound now
        try:
            evicting = pool.submit(stream, "inf-b", 4)  # its release evicts (inf-b among the idle)
            evicted_at = evicting.result()[0][-1]
            gaps, last_token = [], 0.0
            for future in streams:
                times, count = future.result()
                gaps.append(max((b - a for a, b in itertools.pairwise(times) if b > evicted_at), default=0.0))
                last_token = max(last_token, times[-1])
                assert count == 128, "a base stream ended early: the test needs them open"
        finally:
            core.cache.max_bytes = bound
    worst = max(gaps)
    print(f"largest token gap across 31 streams during the eviction: {worst * 1000:.0f} ms")
    assert deleting and deleting[0] < last_token, "no adapter's files were deleted while the streams were open"
    assert not any(e.resolved.name == "inf-b" for e in core.cache.entries.values())
    assert worst < 1.0, f"a stream waited {worst:.2f}s for its next token while an adapter's files were deleted"
