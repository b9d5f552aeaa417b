"""The registry through a real gRPC server, on every storage backend (see conftest.py)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tunedock.client import RegistryClient
from tunedock.client.registry import scan_directory
from tunedock.v1 import adapter_registry_pb2 as pb
from tunedock.v1 import common_pb2

LORA = pb.ARTIFACT_KIND_LORA_ADAPTER


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _raw_publish(
    client: RegistryClient, name: str, files: dict[str, bytes], declared: dict[str, bytes] | None = None, kind=LORA
):
    """Publish through the raw stub: `declared` is what the manifest claims, `files` what is sent."""
    declared = files if declared is None else declared
    manifest = pb.Manifest(
        name=name,
        kind=kind,
        files=[pb.FileEntry(path=p, size=len(b), sha256=hashlib.sha256(b).hexdigest()) for p, b in declared.items()],
    )
    requests = [pb.PublishRequest(manifest=manifest)]
    requests += [pb.PublishRequest(chunk=pb.FileChunk(path=p, offset=0, data=b)) for p, b in files.items()]
    return client.stub.Publish(iter(requests), timeout=30)


def _assert_nothing_visible(client: RegistryClient, name: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.resolve(name)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert name not in {a.name for a in client.list_artifacts()}


def _stored_blob_count(backend) -> int:
    from services.common.blobs import open_blob_store

    settings = backend.settings()
    return sum(1 for _ in open_blob_store(settings.blob_url, settings.s3_endpoint_url).list())


def test_publish_then_download_gives_identical_bytes(client, adapter_dir, tmp_path):
    lineage = pb.Lineage(
        base_model="tiny",
        method=common_pb2.METHOD_LORA,
        job_id="job-1",
        dataset_ids=["ds-1"],
        metrics=[common_pb2.Metric(name="train_loss", value=1.25)],
    )
    reply = client.publish_dir(adapter_dir, "demo-adapter", lineage=lineage, labels={"team": "a"})
    version = reply.version
    assert (version.name, version.version, reply.deduplicated) == ("demo-adapter", 1, False)
    assert version.lora_rank == 4 and version.lora_alpha == 8.0
    assert list(version.target_modules) == ["q_proj", "v_proj"]
    assert list(version.aliases) == ["latest"]
    local = {f.path: f.sha256 for f in scan_directory(adapter_dir)}
    assert {f.path: f.sha256 for f in version.files} == local
    got = client.download("demo-adapter:1", tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(adapter_dir)
    assert got.lineage.job_id == "job-1" and got.lineage.metrics[0].value == 1.25
    assert client.get("demo-adapter").labels[0].value == "a"


def test_identical_content_returns_the_existing_version(client, adapter_dir):
    first = client.publish_dir(adapter_dir, "dup")
    again = client.publish_dir(adapter_dir, "dup")
    assert again.deduplicated and again.version.version == first.version.version == 1
    assert [v.version for v in client.list_versions("dup")] == [1]


def test_an_idempotency_key_returns_the_first_publishs_version(client, adapter_dir):
    """A retried publish (a job's second attempt) returns the first version even if its bytes differ."""
    first = client.publish_dir(adapter_dir, "keyed", idempotency_key="job:j1:output")
    _second_version(adapter_dir)
    again = client.publish_dir(adapter_dir, "keyed", idempotency_key="job:j1:output")
    assert again.deduplicated and again.version.version == first.version.version == 1
    assert again.version.content_sha256 == first.version.content_sha256
    other = client.publish_dir(adapter_dir, "keyed", idempotency_key="job:j2:output")
    assert not other.deduplicated and other.version.version == 2
    assert [v.version for v in client.list_versions("keyed")] == [2, 1]
    with pytest.raises(grpc.RpcError) as info:
        client.publish_dir(adapter_dir, "keyed", idempotency_key="k" * 201)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "idempotency_key" in info.value.details()


def test_full_model_artifact_round_trip(client, tiny_model_dir, tmp_path):
    reply = client.publish_dir(tiny_model_dir, "tiny-base", kind="model")
    assert reply.version.kind == pb.ARTIFACT_KIND_MODEL
    client.download("tiny-base@latest", tmp_path / "m")
    assert _tree(tmp_path / "m") == _tree(tiny_model_dir)


def test_download_resumes_from_an_offset(client, adapter_dir):
    client.publish_dir(adapter_dir, "resume")
    data = (adapter_dir / "adapter_model.safetensors").read_bytes()
    offset = len(data) // 3
    parts = list(
        client.stub.Download(pb.DownloadRequest(ref="resume:1", path="adapter_model.safetensors", offset=offset))
    )
    assert parts[1].chunk.offset == offset
    assert b"".join(p.chunk.data for p in parts[1:]) == data[offset:]
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Download(pb.DownloadRequest(ref="resume:1", offset=5)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs a path" in info.value.details()


def test_disconnect_mid_upload_leaves_no_version_and_no_blobs(client, server, backend, adapter_dir):
    files = {p: (adapter_dir / p).read_bytes() for p in ("adapter_config.json", "adapter_model.safetensors")}
    manifest = pb.Manifest(
        name="gone",
        kind=LORA,
        files=[pb.FileEntry(path=p, size=len(b), sha256=hashlib.sha256(b).hexdigest()) for p, b in files.items()],
    )
    sent = threading.Event()

    def requests():
        yield pb.PublishRequest(manifest=manifest)
        yield pb.PublishRequest(
            chunk=pb.FileChunk(path="adapter_config.json", offset=0, data=files["adapter_config.json"])
        )
        sent.set()
        time.sleep(30)  # the client "hangs" here; the call is cancelled below

    future = client.stub.Publish.future(requests(), timeout=60)
    assert sent.wait(10)
    time.sleep(0.3)
    future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    deadline = time.monotonic() + 10
    staging = backend.data_dir / "registry" / "staging"
    while list(staging.glob("publish-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(staging.glob("publish-*")), "staging files of the abandoned upload remain"
    _assert_nothing_visible(client, "gone")
    assert _stored_blob_count(backend) == 0


def test_corrupted_chunk_is_refused(client, backend, adapter_dir):
    files = {p: (adapter_dir / p).read_bytes() for p in ("adapter_config.json", "adapter_model.safetensors")}
    corrupted = dict(files)
    weights = bytearray(files["adapter_model.safetensors"])
    weights[-1] ^= 0xFF
    corrupted["adapter_model.safetensors"] = bytes(weights)
    with pytest.raises(grpc.RpcError) as info:
        _raw_publish(client, "corrupt", corrupted, declared=files)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "adapter_model.safetensors" in info.value.details() and "sha256" in info.value.details()
    _assert_nothing_visible(client, "corrupt")
    assert _stored_blob_count(backend) == 0


def _adapter_files(adapter_dir: Path) -> dict[str, bytes]:
    return {p: (adapter_dir / p).read_bytes() for p in ("adapter_config.json", "adapter_model.safetensors")}


def _with_config(adapter_dir: Path, **changes) -> dict[str, bytes]:
    files = _adapter_files(adapter_dir)
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    files["adapter_config.json"] = json.dumps(config).encode()
    return files


def _truncated_weights(adapter_dir: Path) -> dict[str, bytes]:
    files = _adapter_files(adapter_dir)
    files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:-100]
    return files


def _renamed_tensor(adapter_dir: Path) -> dict[str, bytes]:
    """A well-formed safetensors file that lacks every lora_B tensor."""
    from safetensors.torch import load, save

    files = _adapter_files(adapter_dir)
    tensors = load(files["adapter_model.safetensors"])
    files["adapter_model.safetensors"] = save({k: v for k, v in tensors.items() if "lora_B" not in k})
    return files


REFUSALS = [
    (
        "config not json",
        lambda d: {**_adapter_files(d), "adapter_config.json": b"{not json"},
        grpc.StatusCode.FAILED_PRECONDITION,
        "adapter_config.json: not valid JSON",
    ),
    (
        "not lora",
        lambda d: _with_config(d, peft_type="PREFIX_TUNING"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "only LoRA adapters",
    ),
    ("rank mismatch", lambda d: _with_config(d, r=8), grpc.StatusCode.FAILED_PRECONDITION, "do not agree with r=8"),
    (
        "rank not positive",
        lambda d: _with_config(d, r=0),
        grpc.StatusCode.FAILED_PRECONDITION,
        "r must be a positive integer",
    ),
    (
        "module not targeted",
        lambda d: _with_config(d, target_modules=["k_proj"]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "is not among target_modules",
    ),
    ("lora_B missing", _renamed_tensor, grpc.StatusCode.FAILED_PRECONDITION, "has no lora_B tensor"),
    ("truncated safetensors", _truncated_weights, grpc.StatusCode.FAILED_PRECONDITION, "truncated or corrupt"),
    (
        "garbage safetensors",
        lambda d: {**_adapter_files(d), "adapter_model.safetensors": b"\xff" * 64},
        grpc.StatusCode.FAILED_PRECONDITION,
        "adapter_model.safetensors: not a complete safetensors file, it is truncated or corrupt",
    ),
    (
        "missing weights",
        lambda d: {"adapter_config.json": _adapter_files(d)["adapter_config.json"]},
        grpc.StatusCode.FAILED_PRECONDITION,
        "missing: adapter_model.safetensors",
    ),
    (
        "dotdot path",
        lambda d: {**_adapter_files(d), "../escape.txt": b"x"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "'../escape.txt' has an empty, '.' or '..' component",
    ),
    (
        "absolute path",
        lambda d: {**_adapter_files(d), "/etc/passwd": b"x"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "'/etc/passwd' is absolute",
    ),
    (
        "too large",
        lambda d: {**_adapter_files(d), "big.bin": b"\0" * (65 * 1024 * 1024)},
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the limit is 64 MiB",
    ),
]


@pytest.mark.parametrize(("case", "make", "code", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_validation_refusals_name_the_file_and_problem(client, backend, adapter_dir, case, make, code, message):
    client.publish_dir(adapter_dir, "kept")  # something stored already must survive every refusal
    stored = _stored_blob_count(backend)
    files = make(adapter_dir)
    with pytest.raises(grpc.RpcError) as info:
        # An oversized artifact is refused on its manifest, before any byte is sent.
        _raw_publish(client, "refused", files if case != "too large" else {}, declared=files)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    _assert_nothing_visible(client, "refused")
    assert client.resolve("kept").version == 1
    assert _stored_blob_count(backend) == stored


def test_bad_names_and_refs(client, adapter_dir):
    with pytest.raises(grpc.RpcError) as info:
        client.publish_dir(adapter_dir, "Bad Name!")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid artifact name" in info.value.details()
    for ref, fragment in [("x:0", "version after ':'"), ("", "empty reference"), ("x@", "invalid alias")]:
        with pytest.raises(grpc.RpcError) as info:
            client.resolve(ref)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.resolve("nope@prod")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "artifact 'nope' not found" in info.value.details()


@pytest.mark.parametrize("ref", [":²", "x:²", "x:7³", "x:٣", "x:1e3", "x:+1", "x: 1", "x:99999999999999999999"])
def test_versions_in_refs_are_ascii_numbers_in_range(client, ref):
    """str.isdigit() accepts superscripts and other scripts' digits that int() refuses (fuzzing found ':²')."""
    with pytest.raises(grpc.RpcError) as info:
        client.resolve(ref)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "invalid" in info.value.details()


@pytest.mark.parametrize("version", [0, -1, -(2**31)])
def test_alias_and_delete_versions_out_of_range_are_refused(client, adapter_dir, version):
    client.publish_dir(adapter_dir, "ranged")
    for call in (lambda: client.set_alias("ranged", "prod", version), lambda: client.delete_version("ranged", version)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version must be from 1" in info.value.details()
        )
    assert client.resolve("ranged").version == 1  # nothing changed


def _second_version(adapter_dir: Path) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["lora_dropout"] = 0.05
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))


def test_aliases_move_and_guard_deletes(client, adapter_dir):
    client.publish_dir(adapter_dir, "a")
    _second_version(adapter_dir)
    assert client.publish_dir(adapter_dir, "a").version.version == 2
    assert client.resolve("a").version == 2 and client.resolve("a@latest").version == 2
    moved = client.set_alias("a", "prod", 1)
    assert moved.previous_version == 0 and client.resolve("a@prod").version == 1
    assert client.set_alias("a", "prod", 2).previous_version == 1
    assert client.resolve("a@prod").version == 2
    assert sorted(client.get("a:2").aliases) == ["latest", "prod"]
    with pytest.raises(grpc.RpcError) as info:
        client.set_alias("a", "latest", 1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.set_alias("a", "prod", 7)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no version 7" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.delete_version("a", 2)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "prod" in info.value.details()
    assert sorted(client.delete_version("a", 2, force=True)) == ["latest", "prod"]
    assert client.resolve("a").version == 1  # latest falls back
    with pytest.raises(grpc.RpcError):
        client.resolve("a@prod")
    _second_version(adapter_dir)
    (adapter_dir / "extra.txt").write_text("3")
    assert client.publish_dir(adapter_dir, "a").version.version == 3  # numbers are never reused
    with pytest.raises(grpc.RpcError) as info:
        client.delete_alias("a", "latest")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.set_alias("a", "staging", 1)
    assert client.delete_alias("a", "staging") == 1


def test_concurrent_publishes_number_without_gaps(client, adapter_dir, tmp_path):
    dirs = []
    for i in range(8):
        d = tmp_path / f"v{i}"
        d.mkdir()
        for p in ("adapter_config.json", "adapter_model.safetensors"):
            (d / p).write_bytes((adapter_dir / p).read_bytes())
        (d / "README.md").write_text(f"variant {i}")
        dirs.append(d)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda d: client.publish_dir(d, "busy"), dirs))
    assert sorted(r.version.version for r in replies) == list(range(1, 9))
    assert len({r.version.content_sha256 for r in replies}) == 8
    assert client.resolve("busy").version == 8


def test_list_pages_and_filters(client, adapter_dir, tiny_model_dir):
    for i in range(5):
        (adapter_dir / "README.md").write_text(str(i))
        client.publish_dir(adapter_dir, f"list-{i}", labels={"parity": "even" if i % 2 == 0 else "odd"})
    client.publish_dir(tiny_model_dir, "list-model", kind="model")
    first = client.stub.ListArtifacts(pb.ListArtifactsRequest(page_size=2))
    assert len(first.artifacts) == 2 and first.next_page_token
    names = [a.name for a in client.list_artifacts(page_size=2)]
    assert names == sorted(names) and len(names) == 6
    assert [a.name for a in client.list_artifacts(kind="model")] == ["list-model"]
    assert [a.name for a in client.list_artifacts(labels={"parity": "even"})] == ["list-0", "list-2", "list-4"]
    with pytest.raises(grpc.RpcError) as info:
        client.stub.ListArtifacts(pb.ListArtifactsRequest(page_token="%%%"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Version pages: the token carries a number, which must be ASCII digits (not '²').
    import base64

    for after in ("²", "٣", "1²", "99999999999999999999"):
        token = base64.urlsafe_b64encode(f"p1:{after}".encode()).decode()
        with pytest.raises(grpc.RpcError) as info:
            client.stub.ListVersions(pb.ListVersionsRequest(name="list-0", page_token=token))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in info.value.details()


def test_watch_resumes_after_reconnect(client, adapter_dir):
    stream = client.watch()
    received = []

    def consume():
        try:
            for event in stream:
                received.append(event)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.5)
    client.publish_dir(adapter_dir, "w")
    client.set_alias("w", "prod", 1)
    deadline = time.monotonic() + 10
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stream.cancel()
    reader.join(5)
    assert [e.type for e in received[:2]] == [pb.EVENT_TYPE_PUBLISHED, pb.EVENT_TYPE_ALIAS_MOVED]
    last = received[1].event_id
    # While disconnected: two more changes.
    _second_version(adapter_dir)
    client.publish_dir(adapter_dir, "w")
    client.delete_alias("w", "prod")
    resumed = client.watch(after_event_id=last, timeout=5)
    missed = [next(resumed), next(resumed)]
    resumed.cancel()
    assert [(e.type, e.version) for e in missed] == [(pb.EVENT_TYPE_PUBLISHED, 2), (pb.EVENT_TYPE_ALIAS_DELETED, 1)]
    assert missed[0].event_id > last


def test_restart_keeps_everything(backend, adapter_dir, tmp_path):
    first = backend.start()
    with RegistryClient(first.address) as c:
        c.publish_dir(adapter_dir, "persist")
        c.set_alias("persist", "prod", 1)
    first.stop()
    second = backend.start()
    try:
        with RegistryClient(second.address) as c:
            assert c.resolve("persist@prod").version == 1
            c.download("persist@prod", tmp_path / "back")
            assert _tree(tmp_path / "back") == _tree(adapter_dir)
            _second_version(adapter_dir)
            assert c.publish_dir(adapter_dir, "persist").version.version == 2
    finally:
        second.stop()
