"""The local adapter cache against a real registry (no engine needed): one download per hash,
a byte bound with LRU eviction that spares adapters in use and pinned ones."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from services.adapter_registry.server import build_server as build_registry
from services.adapter_registry.settings import RegistrySettings
from services.common.server_thread import ServerThread
from services.inference.adapters import AdapterCache, AdapterResolver
from services.inference.server import InferenceMetrics
from tunedock.client import RegistryClient


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("cache")
    registry = ServerThread(lambda: build_registry(RegistrySettings(port=0, metrics_port=-1, data_dir=tmp)))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
    )
    client = RegistryClient(registry.address)
    for i in range(4):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_()
        model.save_pretrained(tmp / f"a{i}")
        client.publish_dir(tmp / f"a{i}", f"c{i}")
    yield client, tmp
    client.close()
    registry.stop()


def _cache(client, root, max_bytes):
    metrics = InferenceMetrics.create(CollectorRegistry())
    return (
        AdapterCache(
            root,
            client,
            max_bytes,
            max_lora_rank=16,
            base_fingerprint="",
            base_model="tiny",
            base_shapes={},
            metrics=metrics,
        ),
        AdapterResolver(client),
        metrics,
    )


def _count(metrics, event):
    return metrics.cache_events.labels(event)._value.get()


def test_concurrent_first_requests_download_once(published, tmp_path):
    client, _ = published
    cache, resolver, metrics = _cache(client, tmp_path / "cache", 10 * 2**20)
    resolved = resolver.resolve("c0")
    with ThreadPoolExecutor(8) as pool:
        entries = list(pool.map(lambda _: cache.acquire(resolved), range(8)))
    assert len({id(e) for e in entries}) == 1 and entries[0].in_flight == 8
    assert _count(metrics, "misses") == 1 and _count(metrics, "hits") == 7
    assert metrics.adapter_download._sum.get() > 0
    assert (entries[0].path / "adapter_model.safetensors").exists()


def test_lru_eviction_spares_in_use_and_pinned(published, tmp_path):
    client, _ = published
    probe, resolver, _ = _cache(client, tmp_path / "probe", 10 * 2**20)
    size = probe.acquire(resolver.resolve("c0")).size
    cache, resolver, metrics = _cache(client, tmp_path / "cache", int(2.5 * size))  # room for two
    pinned = cache.acquire(resolver.resolve("c0"), pin=True)
    cache.release(pinned)
    busy = cache.acquire(resolver.resolve("c1"))  # stays in use
    idle = cache.acquire(resolver.resolve("c2"))
    cache.release(idle)
    assert {e.resolved.name for e in cache.entries.values()} == {"c0", "c1"}  # c2 evicted: LRU, idle, unpinned
    assert not idle.path.exists() and _count(metrics, "evictions") == 1
    cache.release(busy)
    again = cache.acquire(resolver.resolve("c3"))
    cache.release(again)
    # c1 is idle now and least recently used; c0 is older but pinned.
    assert {e.resolved.name for e in cache.entries.values()} == {"c0", "c3"}
    assert not busy.path.exists() and _count(metrics, "evictions") == 2


def test_the_registry_watch_survives_a_failing_handler_and_keeps_invalidating(published):
    """A handler that raises (a bug in warm-on-promote, say) is counted and the watch carries on:
    later events still invalidate, so a moved alias is never served stale for good."""
    import threading
    import time

    client, tmp = published
    resolver = AdapterResolver(client)
    seen, failures, stop = [], [], threading.Event()

    def handler(event):
        seen.append((event.name, event.version))
        if len(seen) == 1:
            raise RuntimeError("a bug in a handler")

    watcher = threading.Thread(target=resolver.follow, args=(stop, handler, lambda: failures.append(1)), daemon=True)
    watcher.start()
    try:
        time.sleep(0.5)  # the watch is open (it streams events from now on)
        client.set_alias("c0", "prod", 1)
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures == [1]
        client.publish_dir(tmp / "a1", "c0")  # version 2: the watch must still be listening
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen[0] == ("c0", 1) and seen[-1] == ("c0", 2), seen
    finally:
        stop.set()
        watcher.join(5)
        resolver.close()
