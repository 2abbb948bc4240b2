"""TLS to a server with a self-signed certificate, and the CLI's spinner on a real terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import spindle
from spindle.cli import main
from support.server import ServerProcess

OPENSSL = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost"
SAN = "subjectAltName=IP:127.0.0.1,DNS:localhost"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS server with a fresh self-signed certificate: (address, certificate file).

    Started here rather than with `make_server`: support.server.ServerProcess checks readiness over
    a plaintext channel, which a TLS server never answers.
    """
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = [*OPENSSL.split(), "-addext", SAN, "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    flags = ["--host", "127.0.0.1", "--port", "0", "--database", str(tmp_path / "tls.db")]
    server = subprocess.Popen(
        [sys.executable, "-m", "spindle_server", *flags, "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = next(json.loads(line)["port"] for line in server.stdout if '"serving"' in line)
        yield f"127.0.0.1:{port}", cert
    finally:
        server.kill()
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()


def test_tls_with_trusted_roots(tls_server: tuple[str, Path]) -> None:
    address, cert = tls_server
    with spindle.Client(address, root_certificates=cert.read_bytes(), timeout=10) as client:
        assert client.threads.create(name="over tls").name == "over tls"
    with spindle.Client(address, timeout=2) as plaintext, pytest.raises(spindle.Unavailable):
        plaintext.threads.create()
    out, err = io.StringIO(), io.StringIO()
    code = main(["--target", address, "--ca-file", str(cert), "threads", "create"], stdout=out, stderr=err)
    assert code == 0 and out.getvalue().startswith("thread_")


def test_spinner_is_drawn_on_a_terminal(
    client: spindle.Client, echo: spindle.Assistant, server: ServerProcess
) -> None:
    thread = client.threads.create(messages=["/sleep 5\nslow"])
    run = client.runs.create(thread_id=thread, assistant_id=echo)
    leader, follower = pty.openpty()
    env = {**os.environ, "SPINDLE_TARGET": server.address}
    command = [sys.executable, "-m", "spindle.cli", "wait", run.id, "--timeout", "0.6"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    drawn = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        drawn += chunk
    assert process.wait(timeout=30) == 4  # timeout
    os.close(leader)
    assert process.stdout is not None
    process.stdout.close()
    assert f"waiting for {run.id}".encode() in drawn and b"\r" in drawn
    run.cancel()
