"""Authentication and roles through real servers: tokens in metadata, roles per RPC, open health checks."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.adapter_registry.server import ROLES as REGISTRY_ROLES
from services.adapter_registry.server import build_server as build_registry
from services.adapter_registry.settings import RegistrySettings
from services.common.auth import TokenFile, WorkerTokens
from services.common.server_thread import ServerThread
from services.inference.server import ROLES as INFERENCE_ROLES
from services.trainer.server import ROLES as TRAINER_ROLES
from tunedock.client import RegistryClient
from tunedock.errors import InvalidArgument, PermissionDenied
from tunedock.tokenfile import ROLES, add_token, hash_token, revoke_token
from tunedock.v1 import adapter_registry_pb2 as pb
from tunedock.v1 import adapter_registry_pb2_grpc


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A registry with a token file: one reader, one publisher, one admin."""
    home = tmp_path_factory.mktemp("auth")
    tokens = home / "tokens.json"
    issued = {
        "reader": add_token(tokens, "reader", ["registry.read"], ["team-a"]),
        "publisher": add_token(tokens, "publisher", ["registry.read", "registry.publish"], ["team-a"]),
        "admin": add_token(tokens, "admin", ["all"], ["*"]),
        "nobody": add_token(tokens, "nobody", [], ["team-a"]),
    }
    server = ServerThread(
        lambda: build_registry(RegistrySettings(port=0, metrics_port=-1, data_dir=home, token_file=str(tokens)))
    )
    yield server, issued, tokens
    server.stop()


def stub(address: str, token: str | None):
    channel = grpc.insecure_channel(address)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return channel, adapter_registry_pb2_grpc.AdapterRegistryServiceStub(channel), metadata


def test_tokens_are_stored_hashed(secured):
    _, issued, tokens = secured
    text = tokens.read_text()
    assert all(token not in text for token in issued.values())
    assert hash_token(issued["reader"]) in text
    assert (tokens.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "no credentials: the call has no 'authorization' metadata"),
        ((("authorization", "Bearer td_not-a-real-token"),), "the bearer token is unknown, revoked or expired"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "its scheme is 'Basic', not Bearer"),
        ((("authorization", "BARE"),), "one word with no 'Bearer ' prefix"),
        ((("authorization", "Bearer "),), "says 'Bearer' but carries no token"),
        ((("authorization", ""),), "it is empty"),
    ],
    ids=["none", "wrong", "not-bearer", "bare-token", "bearer-alone", "empty"],
)
def test_missing_or_unknown_token_is_unauthenticated_saying_what_is_wrong(secured, metadata, message):
    server, issued, _ = secured
    channel, registry, _ = stub(server.address, None)
    metadata = tuple((k, issued["reader"] if v == "BARE" else v) for k, v in metadata)
    with channel, pytest.raises(grpc.RpcError) as info:
        registry.ListArtifacts(pb.ListArtifactsRequest(), metadata=metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in info.value.details()
    assert all(token not in info.value.details() for token in issued.values())  # a secret is never echoed


def test_server_info_needs_a_token_but_no_role(secured):
    server, issued, _ = secured
    with RegistryClient(server.address, token=issued["nobody"]) as client:
        info = client.info()
        with pytest.raises(PermissionDenied):
            list(client.list_artifacts())
    assert info.metadata_backend == "sqlite" and info.blob_backend == "local"
    assert info.max_artifact_bytes == RegistrySettings().max_artifact_mb * 2**20 and info.max_page_size == 1000
    assert set(info.artifact_kinds) == {"lora_adapter", "model", "delta"} and info.version
    channel, registry, _ = stub(server.address, None)
    with channel, pytest.raises(grpc.RpcError) as refused:
        registry.GetRegistryInfo(pb.GetRegistryInfoRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open_and_reflection_needs_a_token(secured):
    server, issued, _ = secured
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(reflect.ServerReflectionInfo(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(
            reflect.ServerReflectionInfo(
                iter([request]), metadata=(("authorization", f"Bearer {issued['reader']}"),), timeout=10
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert "tunedock.v1.AdapterRegistryService" in names


@pytest.mark.parametrize(
    ("who", "call", "role"),
    [
        (
            "reader",
            lambda r, m: r.SetAlias(pb.SetAliasRequest(name="x", alias="prod", version=1), metadata=m),
            "registry.admin",
        ),
        (
            "reader",
            lambda r, m: r.DeleteVersion(pb.DeleteVersionRequest(name="x", version=1), metadata=m),
            "registry.admin",
        ),
        (
            "publisher",
            lambda r, m: r.DeleteAlias(pb.DeleteAliasRequest(name="x", alias="a"), metadata=m),
            "registry.admin",
        ),
        ("reader", lambda r, m: r.Publish(iter([pb.PublishRequest()]), metadata=m), "registry.publish"),
    ],
    ids=["alias", "delete", "publisher-no-admin", "publish"],
)
def test_each_role_denial_names_the_role(secured, who, call, role):
    server, issued, _ = secured
    channel, registry, metadata = stub(server.address, issued[who])
    with channel, pytest.raises(grpc.RpcError) as info:
        call(registry, metadata)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"{who} lacks the role {role}" in info.value.details()


def test_the_sdk_sends_its_token_and_a_permitted_call_succeeds(secured, tmp_path, tiny_model_dir, monkeypatch):
    server, issued, _ = secured
    with RegistryClient(server.address, token=issued["publisher"]) as client:
        assert list(client.list_artifacts()) == []
    monkeypatch.setenv("TUNEDOCK_TOKEN", issued["reader"])  # the environment is the default source
    with RegistryClient(server.address) as client, pytest.raises(grpc.RpcError) as info:
        client.set_alias("x", "prod", 1)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_revoked_token_stops_working_without_a_restart(secured, tmp_path):
    server, _, tokens = secured
    temp = add_token(tokens, "temporary", ["registry.read"], ["team-a"])
    time.sleep(2.1)  # the file is re-read at most every 2 s
    with RegistryClient(server.address, token=temp) as client:
        assert list(client.list_artifacts()) == []
        assert revoke_token(tokens, "temporary")
        time.sleep(2.1)
        with pytest.raises(grpc.RpcError) as info:
            list(client.list_artifacts())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_rpc_of_every_service_has_a_known_role():
    from tunedock.v1 import adapter_registry_pb2, inference_pb2, trainer_pb2

    services = {
        "AdapterRegistryService": (adapter_registry_pb2, REGISTRY_ROLES),
        "InferenceService": (inference_pb2, INFERENCE_ROLES),
        "TrainerService": (trainer_pb2, TRAINER_ROLES),
        "TrainerWorkerService": (trainer_pb2, TRAINER_ROLES),
    }
    open_to_any_caller = set()
    for name, (module, roles) in services.items():
        for rpc in module.DESCRIPTOR.services_by_name[name].methods_by_name:
            if roles[rpc] is None:
                open_to_any_caller.add(rpc)
            else:
                assert roles[rpc] in ROLES, (name, rpc)
    # Only "what does this server serve" needs no role (it still needs a valid token).
    assert open_to_any_caller == {"GetInferenceInfo", "GetTrainerInfo", "GetRegistryInfo"}


def test_a_non_loopback_bind_without_auth_is_refused(tmp_path):
    with pytest.raises(InvalidArgument) as info:
        RegistrySettings(host="0.0.0.0", port=0, data_dir=tmp_path)
    assert "refusing to serve 0.0.0.0 without authentication" in info.value.message
    assert RegistrySettings(host="0.0.0.0", port=0, data_dir=tmp_path, insecure=True).insecure
    assert RegistrySettings(host="::1", port=0, data_dir=tmp_path).host == "::1"  # loopback is fine


def test_bad_token_files_fail_at_start(tmp_path):
    bad = tmp_path / "tokens.json"
    bad.write_text(json.dumps({"tokens": [{"name": "x", "sha256": "ab", "roles": ["registry.rule"]}]}))
    with pytest.raises(InvalidArgument, match="unknown role"):
        TokenFile(bad)


def test_worker_tokens_are_signed_scoped_and_expire():
    minted = WorkerTokens(b"k" * 32)
    token = minted.issue("job-1", 1, "team-a", ("out", "out-full"), ttl_s=60)
    who = minted.verify(token)
    assert who.job_id == "job-1" and who.projects == {"team-a"} and who.publish_names == ("out", "out-full")
    assert WorkerTokens(b"x" * 32).verify(token) is None  # another key
    body, signature = token.rsplit(".", 1)
    assert minted.verify(body[:-2] + "xx." + signature) is None  # tampered
    assert minted.verify(minted.issue("job-1", 1, "team-a", ("out",), ttl_s=-1)) is None  # expired
    import base64

    for payload in (b"[]", b'{"job": "j"}', b"null"):  # signed with the key, but not a payload the trainer writes
        odd = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
        assert minted.verify(f"tdw.{odd}.{minted._sign(odd)}") is None


def test_tokens_cli_creates_lists_and_revokes(tmp_path):
    import subprocess
    import sys

    tokens = tmp_path / "tokens.json"

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "tunedock.cli", "tokens", *args, "-f", str(tokens)], capture_output=True, text=True
        )

    created = cli("create", "carol", "-r", "registry.read", "-r", "inference.generate", "-p", "team-c", "-q")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    who = TokenFile(tokens).lookup(token)
    assert who.name == "carol" and who.roles == {"registry.read", "inference.generate"} and who.projects == {"team-c"}
    listed = json.loads(cli("ls", "--json").stdout)
    assert listed == [
        {"name": "carol", "roles": ["inference.generate", "registry.read"], "projects": ["team-c"], "kind": "user"}
    ]
    bad = cli("create", "dave", "-r", "registry.rule")
    assert bad.returncode == 2 and "unknown role(s) ['registry.rule']" in bad.stderr
    assert cli("revoke", "carol").returncode == 0
    assert TokenFile(tokens).lookup(token) is None


def test_the_entrypoint_refuses_a_public_bind_without_auth(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.adapter_registry",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to serve 0.0.0.0 without authentication" in result.stderr
    assert not (tmp_path / "registry").exists()  # refused before anything was created


@pytest.mark.parametrize(
    ("grant", "status"),
    [(None, "UNAUTHENTICATED"), (([], ["*"]), "PERMISSION_DENIED")],
    ids=["unknown-token", "token-without-registry-read"],
)
def test_a_trainer_whose_registry_token_is_refused_fails_fast_naming_it(secured, tmp_path, grant, status):
    """A misconfigured service token is the operator's to fix, not an outage: the caller hears at once
    which status the registry gave and which setting to change, and nothing is stored."""
    from services.trainer.server import build_server as build_trainer
    from services.trainer.settings import TrainerSettings
    from tunedock.client import TrainerClient
    from tunedock.errors import FailedPrecondition
    from tunedock.tokenfile import load_key
    from tunedock.v1 import trainer_pb2 as tpb

    registry, issued, tokens = secured
    service_token = tmp_path / "service.token"
    service_token.write_text("td_not-a-token" if grant is None else add_token(tokens, f"svc-{status}", *grant))
    load_key(tmp_path / "worker.key")
    trainer = ServerThread(
        lambda: build_trainer(
            TrainerSettings(
                port=0,
                metrics_port=-1,
                worker_port=0,
                data_dir=tmp_path,
                token_file=str(tokens),
                worker_key_file=str(tmp_path / "worker.key"),
                registry_address=registry.address,
                registry_token_file=str(service_token),
            )
        )
    )
    time.sleep(2.1)  # the registry re-reads its token file at most every 2 s
    try:
        with TrainerClient(trainer.address, token=issued["admin"]) as client:
            started = time.monotonic()
            with pytest.raises(FailedPrecondition) as info:
                client.submit(tpb.JobSpec(output_name="x-lora", extract=tpb.ExtractSpec(source="some-model@prod")))
            assert time.monotonic() - started < 5
            assert list(client.list()) == []
    finally:
        trainer.stop(grace=0.5)
    message = info.value.message
    assert f"refused the trainer's own credentials ({status}" in message
    assert "TUNEDOCK_TRAINER_REGISTRY_TOKEN_FILE" in message and "'some-model@prod'" in message
