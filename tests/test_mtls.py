"""Mutual TLS (--tls-client-ca): only clients with a certificate the CA signed get through the
handshake; API keys, when configured, still apply on top."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import spindle
from spindle.cli import main as cli
from spindle.v1 import thread_pb2, thread_pb2_grpc
from spindle_server.config import parse_config
from support.certs import Pair, issue, make_ca, openssl_available
from support.server import ServerProcess
from support.stubs import error_details

pytestmark = pytest.mark.skipif(not openssl_available(), reason="openssl makes the test certificates")


@dataclass(frozen=True)
class Pki:
    ca: Pair
    server: Pair
    client: Pair
    stranger: Pair  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca(folder, "spindle-ca"), make_ca(folder, "other-ca")
    return Pki(
        ca=ca,
        server=issue(ca, folder, "server", server=True),
        client=issue(ca, folder, "client", server=False),
        stranger=issue(other_ca, folder, "stranger", server=False),
    )


def mtls_flags(pki: Pki) -> list[str]:
    return [
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--tls-client-ca", str(pki.ca.cert),
    ]  # fmt: skip


def raw_call(address: str, pki: Pki, client: Pair | None, key: str | None = None) -> thread_pb2.Thread:
    """One CreateThread over a channel of our own (no client-side retries to hide the failure)."""
    cert, private_key = client.read() if client else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(), private_key=private_key, certificate_chain=cert
    )
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with grpc.secure_channel(address, credentials) as channel:
        stub = thread_pb2_grpc.ThreadServiceStub(channel)
        reply: thread_pb2.Thread = stub.Create(
            thread_pb2.CreateThreadRequest(name="mtls"), timeout=30, metadata=metadata
        )
        return reply


def test_client_certificate_from_the_ca_is_required(
    make_server: Callable[..., ServerProcess], pki: Pki
) -> None:
    server = make_server(*mtls_flags(pki))
    assert raw_call(server.address, pki, pki.client).name == "mtls"
    for presented in (None, pki.stranger):
        with pytest.raises(grpc.RpcError) as refused:
            raw_call(server.address, pki, presented)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, presented
    # The Python client and the CLI present a certificate the same way.
    cert, key = pki.client.read()
    roots = pki.ca.cert.read_bytes()
    with spindle.Client(server.address, root_certificates=roots, client_cert=cert, client_key=key) as client:
        assert client.threads.create(name="python client").name == "python client"
    out, err = io.StringIO(), io.StringIO()
    argv = [
        "--target", server.address, "--ca-file", str(pki.ca.cert),
        "--tls-client-cert", str(pki.client.cert), "--tls-client-key", str(pki.client.key),
        "threads", "create",
    ]  # fmt: skip
    assert cli(argv, stdout=out, stderr=err) == 0, err.getvalue()
    assert out.getvalue().startswith("thread_")
    # Refused handshakes cost the server nothing: it still serves certified clients.
    assert server.process is not None and server.process.poll() is None
    assert raw_call(server.address, pki, pki.client).name == "mtls"


async def test_async_client_presents_its_certificate(
    make_server: Callable[..., ServerProcess], pki: Pki
) -> None:
    server = make_server(*mtls_flags(pki))
    cert, key = pki.client.read()
    async with spindle.AsyncClient(
        server.address, root_certificates=pki.ca.cert.read_bytes(), client_cert=cert, client_key=key
    ) as client:
        assert (await client.threads.create(name="async")).name == "async"


def test_api_keys_still_apply_over_mutual_tls(
    make_server: Callable[..., ServerProcess], pki: Pki, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "spindle_server",
            "keys",
            "add",
            "--project",
            "alpha",
            "--file",
            str(keys_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = added.stdout.strip()
    server = make_server(*mtls_flags(pki), "--api-keys-file", str(keys_file))
    for wrong, reason in ((None, "MISSING_API_KEY"), ("sk-spindle-not-a-key", "INVALID_API_KEY")):
        with pytest.raises(grpc.RpcError) as refused:
            raw_call(server.address, pki, pki.client, wrong)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info, _ = error_details(refused.value)
        assert info is not None and info.reason == reason
    assert raw_call(server.address, pki, pki.client, key).name == "mtls"
    with pytest.raises(grpc.RpcError) as no_certificate:  # a key does not replace the certificate
        raw_call(server.address, pki, None, key)
    assert no_certificate.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_ca_needs_tls(pki: Pki) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(["--tls-client-ca", str(pki.ca.cert)])
    assert exited.value.code == 2
    config = parse_config(mtls_flags(pki))
    assert config.tls_client_ca == pki.ca.cert


def test_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="go together"):
        spindle.Client("127.0.0.1:1", client_cert=pki.client.cert.read_bytes())
    err = io.StringIO()
    argv = ["--target", "127.0.0.1:1", "--tls-client-cert", str(pki.client.cert), "threads", "create"]
    assert cli(argv, stdout=io.StringIO(), stderr=err) == 2
    assert "go together" in err.getvalue()
