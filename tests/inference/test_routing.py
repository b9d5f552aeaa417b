"""Two inference replicas behind HAProxy (deploy/haproxy/haproxy.cfg), found through DNS SRV records.

Real processes throughout: two `services.inference` replicas with their own vLLM engines, dnsmasq
publishing them as a headless Service does, HAProxy with the repository's config, and the SDK.
What lands where is read from the replicas' own metrics.
"""

from __future__ import annotations

import time

import pytest

from tests.inference.test_inference_service import _train_adapter
from tests.support.local_fleet import LocalFleet
from tunedock.client import InferenceClient, RegistryClient
from tunedock.v1 import inference_pb2 as ipb

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ADAPTERS = [f"route-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def fleet(inference_stack, tiny_model_dir, tmp_path_factory):
    registry = inference_stack.registry.address
    home = tmp_path_factory.mktemp("fleet")
    with RegistryClient(registry) as client:
        for i, name in enumerate(ADAPTERS):
            client.publish_dir(_train_adapter(tiny_model_dir, home, 100 + i), name)
    fleet = LocalFleet(
        home,
        str(tiny_model_dir),
        registry,
        replica_args=[
            "--max-loras",
            "2",
            "--max-cpu-loras",
            "4",
            "--max-lora-rank",
            "16",
            "--max-model-len",
            "512",
            "--dtype",
            "float32",
        ],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    fleet.start()
    try:
        fleet.wait_ready(timeout=600)
        yield fleet
    finally:
        fleet.stop()


def _ask(client: InferenceClient, adapter: str = "") -> str:
    return client.generate("Tell me about the moon.", adapter, max_tokens=4).completions[0].text


def _owners(fleet: LocalFleet) -> dict[str, int]:
    """{adapter: the replica that served it}, asserting each was served by exactly one."""
    served = _counts(fleet)
    owners = {}
    for name in ADAPTERS:
        on = [index for index, counts in served.items() if counts.get(name, 0) > 0]
        assert len(on) == 1, f"{name} was served by replicas {on}: {served}"
        owners[name] = on[0]
    return owners


def _unary_calls(fleet: LocalFleet, index: int) -> float:
    return fleet.value(index, "tunedock_rpc_requests_total", method="GenerateUnary", code="OK")


def _counts(fleet: LocalFleet) -> dict[int, dict[str, float]]:
    return {r.index: fleet.adapter_requests(r.index) for r in fleet.members}


def test_each_adapter_lands_on_one_replica_and_base_requests_spread(fleet):
    with InferenceClient(fleet.proxy_address) as client:
        for _ in range(3):
            for name in ADAPTERS:
                _ask(client, name)
        for _ in range(8):
            _ask(client)
    owners = _owners(fleet)
    counts = _counts(fleet)
    assert all(counts[owners[name]][name] == 3 for name in ADAPTERS)
    assert set(owners.values()) == {1, 2}, f"the hash put every adapter on one replica: {owners}"
    base = {r.index: _unary_calls(fleet, r.index) - sum(counts[r.index].values()) for r in fleet.members}
    assert sum(base.values()) == 8 and min(base.values()) >= 2, f"base requests did not spread: {base}"


def _serving_of_all(fleet: LocalFleet, via: int) -> dict:
    import httpx

    url = f"http://127.0.0.1:{fleet.members[via - 1].http_port}/tunedock/v1/serving"
    answer = httpx.get(url, params={"replicas": 1}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_serving_view_shows_every_replica_with_its_own_adapters_and_throughput(fleet):
    """One replica asked (as the console asks whichever the proxy picks) answers for all of them, each
    replica's part coming from that replica: its adapters are the ones the hash sent it."""
    owners = _owners(fleet)
    view = _serving_of_all(fleet, via=1)
    by_port = {int(r["address"].rsplit(":", 1)[1]): r for r in view["replicas"]}
    assert set(by_port) == {r.http_port for r in fleet.members}, view["replicas"]
    for member in fleet.members:
        replica = by_port[member.http_port]
        assert "error" not in replica, replica
        names = {a["ref"].split(":")[0] for a in replica["adapters"]}
        assert names == {n for n, owner in owners.items() if owner == member.index}, (member.index, names)
        assert replica["replica"]["max_loras"] == 2 and replica["engine"]["queued_requests"] == 0
    # The first test generated 3 x 8 adapter requests and 8 base ones within the last minute.
    assert sum(r["throughput"]["tokens_per_s_60s"] for r in by_port.values()) > 0


def test_a_promotion_is_warmed_on_the_replica_that_owns_the_adapter(fleet, inference_stack, tiny_model_dir, tmp_path):
    name = ADAPTERS[0]
    owner = _owners(fleet)[name]
    other = 3 - owner
    with RegistryClient(inference_stack.registry.address) as registry:
        version = registry.publish_dir(_train_adapter(tiny_model_dir, tmp_path, 999), name).version
        registry.set_alias(name, "prod", version.version)

    def loaded(index: int) -> set[str]:
        with InferenceClient(fleet.members[index - 1].address) as client:
            return {f"{a.name}:{a.version}" for a in client.loaded() if a.state == ipb.ADAPTER_CACHE_STATE_LOADED}

    deadline = time.monotonic() + 60
    while f"{name}:{version.version}" not in loaded(owner) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"{name}:{version.version}" in loaded(owner)
    assert fleet.value(owner, "tunedock_adapter_warmed_total") >= 1
    assert f"{name}:{version.version}" not in loaded(other)
    with InferenceClient(fleet.proxy_address) as client:
        reply = client.generate("Tell me about the moon.", f"{name}@prod", max_tokens=4)
    assert reply.adapter_version == f"{name}:{version.version}"
    assert _counts(fleet)[owner].get(name, 0) == 4  # three before, this one: the same replica


def test_a_killed_replica_moves_only_its_adapters_and_gets_them_back(fleet):
    owners = _owners(fleet)
    victim = owners[ADAPTERS[1]]
    survivor = 3 - victim
    before = _counts(fleet)
    fleet.kill_replica(victim)
    time.sleep(1.0)  # one health-check interval (inter 1s); the first failed connection marks it down anyway
    failures = []
    with InferenceClient(fleet.proxy_address, timeout=120) as client:
        for name in ADAPTERS:
            try:
                _ask(client, name)
            except Exception as exc:
                failures.append((name, exc))
    assert failures == [], failures
    after = fleet.adapter_requests(survivor)
    # Every adapter was served by the survivor; the survivor's own adapters never moved.
    assert all(after.get(n, 0) == before[survivor].get(n, 0) + 1 for n in ADAPTERS), (before, after)
    # The Serving view still answers, naming the replica that does not.
    view = {r["address"]: r for r in _serving_of_all(fleet, via=survivor)["replicas"]}
    dead = next(r for a, r in view.items() if a.endswith(f":{fleet.members[victim - 1].http_port}"))
    assert "no answer" in dead["error"]

    fleet.start_replica(victim)
    fleet.wait_ready(timeout=600)
    moved_back = {n for n in ADAPTERS if owners[n] == victim}
    with InferenceClient(fleet.proxy_address) as client:
        for name in ADAPTERS:
            _ask(client, name)
    back = fleet.adapter_requests(victim)
    assert {n for n, c in back.items() if c > 0} == moved_back, "the hash did not move the victim's adapters back"
    final = fleet.adapter_requests(survivor)
    assert all(final.get(n, 0) == after.get(n, 0) + (0 if n in moved_back else 1) for n in ADAPTERS)


def _openai_chats(fleet: LocalFleet, index: int) -> float:
    chats = {"service": "openai", "method": "/v1/chat/completions", "code": "200"}
    return fleet.value(index, "tunedock_rpc_requests_total", **chats)


def test_openai_requests_are_routed_on_the_body_model_each_adapter_to_one_replica(fleet):
    """The proxy reads `model` out of the JSON body: "name" and "name:1" are one adapter, one replica;
    the base's id spreads by load; a body past the proxy's buffer is still answered (routed by load).
    Last in the module: the gRPC tests above count every request an adapter got."""
    from openai import OpenAI

    before = _counts(fleet)
    chats_before = {r.index: _openai_chats(fleet, r.index) for r in fleet.members}
    client = OpenAI(base_url=fleet.openai_base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me about the moon."}]
    for model in [m for name in ADAPTERS for m in (name, f"{name}:1", name)]:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
        served = reply.model  # the version that answered: "name:1" as asked, or the name's latest
        assert (served == model) if ":" in model else served.startswith(f"{model}:"), (model, served)
    for _ in range(8):
        assert client.chat.completions.create(model=fleet.base_model_id, messages=messages, max_tokens=4).model == (
            fleet.base_model_id
        )
    after = _counts(fleet)
    for name in ADAPTERS:
        on = {r.index: after[r.index].get(name, 0) - before[r.index].get(name, 0) for r in fleet.members}
        assert sorted(on.values()) == [0, 3], f"{name}'s HTTP requests were split over the replicas: {on}"
    adapters_on = {r.index: sum(after[r.index].values()) - sum(before[r.index].values()) for r in fleet.members}
    base = {i: _openai_chats(fleet, i) - chats_before[i] - adapters_on[i] for i in adapters_on}
    assert sum(base.values()) == 8 and min(base.values()) >= 2, f"base requests did not spread: {base}"

    # 80 KB of JSON: more than tune.bufsize, so `model` cannot be read; the request goes by load.
    padded = client.chat.completions.create(model=ADAPTERS[2], messages=messages, max_tokens=4, user="u" * 80_000)
    assert padded.model == f"{ADAPTERS[2]}:1" and padded.choices[0].message.content
