"""TLS and mTLS round trips through real servers, with certificates made in the test."""

from __future__ import annotations

import grpc
import pytest

from services.adapter_registry.server import build_server as build_registry
from services.adapter_registry.settings import RegistrySettings
from services.common.server_thread import ServerThread
from tests.certs import make_pki
from tunedock.client import RegistryClient
from tunedock.client.channel import TlsFiles
from tunedock.tokenfile import add_token


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def registry(tmp_path, **tls) -> ServerThread:
    return ServerThread(lambda: build_registry(RegistrySettings(port=0, metrics_port=-1, data_dir=tmp_path, **tls)))


def test_tls_round_trip_and_plaintext_is_refused(pki, tmp_path):
    server = registry(tmp_path, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key))
    try:
        with RegistryClient(server.address, token=None, tls=TlsFiles(str(pki.ca))) as client:
            assert list(client.list_artifacts()) == []
        with RegistryClient(server.address, token=None, tls=None, timeout=5) as plain, pytest.raises(grpc.RpcError):
            list(plain.list_artifacts())
        with (
            RegistryClient(server.address, token=None, tls=TlsFiles(str(pki.other_ca)), timeout=5) as wrong,
            pytest.raises(grpc.RpcError) as info,
        ):
            list(wrong.list_artifacts())  # a server certificate the client's CA did not sign
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_mtls_needs_a_client_certificate_and_works_with_tokens(pki, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, "ci", ["registry.read"], ["default"])
    server = registry(
        tmp_path,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
        token_file=str(tokens),
    )
    try:
        with (
            RegistryClient(server.address, token=token, tls=TlsFiles(str(pki.ca)), timeout=5) as anonymous,
            pytest.raises(grpc.RpcError) as info,
        ):
            list(anonymous.list_artifacts())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused: no client certificate
        # The SDK/CLI take TLS settings from the environment.
        monkeypatch.setenv("TUNEDOCK_TLS_CA_FILE", str(pki.ca))
        monkeypatch.setenv("TUNEDOCK_TLS_CERT_FILE", str(pki.client_cert))
        monkeypatch.setenv("TUNEDOCK_TLS_KEY_FILE", str(pki.client_key))
        monkeypatch.setenv("TUNEDOCK_TOKEN", token)
        with RegistryClient(server.address) as client:
            assert list(client.list_artifacts()) == []
        monkeypatch.delenv("TUNEDOCK_TOKEN")
        monkeypatch.setenv("TUNEDOCK_HOME", str(tmp_path / "empty-home"))
        with RegistryClient(server.address) as client, pytest.raises(grpc.RpcError) as info:
            list(client.list_artifacts())  # a certificate is not a token: still UNAUTHENTICATED
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()
