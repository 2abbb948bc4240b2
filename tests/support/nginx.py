"""nginx in front of replicas, as a child process, with the config of deploy/nginx/spindle.conf."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

RENDERER = Path(__file__).resolve().parents[2] / "scripts" / "nginx_conf.py"
STARTUP_TIMEOUT = 30.0


def nginx_binary() -> str | None:
    """nginx's path, or None where it is not installed (Debian keeps it in /usr/sbin)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NginxProcess:
    """``nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`` proxying to ``upstreams``."""

    def __init__(self, binary: str, directory: Path, upstreams: Sequence[str]) -> None:
        self.binary = binary
        self.directory = directory
        self.upstreams = list(upstreams)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def logged(self, needle: str, count: int, timeout: float = 20.0) -> int:
        """Lines of the access log with ``needle`` once there are ``count`` (nginx writes a line
        after the call has ended, so possibly after the client has its answer)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.access_log.read_text(errors="replace") if self.access_log.exists() else ""
            found = sum(needle in line for line in text.splitlines())
            if found >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, attempts: int = 3) -> NginxProcess:
        """Start on a free port (another one if that port was taken meanwhile) and wait until
        it answers a health check through to a replica."""
        for attempt in range(attempts):
            self.port = _free_port()
            self._render()
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "-p",
                    str(self.directory),
                    "-c",
                    str(self.directory / "nginx.conf"),
                    "-e",
                    str(self.directory / "error.log"),
                    "-g",
                    "daemon off;",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # stopped by PID (stop()), not by a terminal's Ctrl-C
            )
            try:
                self._await_serving()
                return self
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1 or "Address already in use" not in self.error_log():
                    raise
        raise AssertionError("not reached")

    def _render(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        upstreams = [arg for address in self.upstreams for arg in ("--upstream", address)]
        text = subprocess.run(
            [
                sys.executable,
                str(RENDERER),
                "--listen",
                self.address,
                *upstreams,
                "--prefix",
                str(self.directory),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (self.directory / "nginx.conf").write_text(text)

    def _await_serving(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"nginx exited at start: {self.error_log()[-4000:]}")
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer in time: {self.error_log()[-4000:]}")

    def stop(self) -> None:
        """SIGQUIT (graceful) would wait for open streams; SIGTERM ends them now."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None
