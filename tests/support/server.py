"""Runs the real `spindle-server` as a child process on 127.0.0.1 with port 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

STARTUP_TIMEOUT = 30.0


class ServerProcess:
    def __init__(
        self, database: Path, extra_args: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> None:
        self.database = database
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.serving: dict[str, object] = {}  # the server's "serving" line (ports it chose)
        self.stderr_lines: list[str] = []
        self._stderr_thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        command = [
            sys.executable,
            "-m",
            "spindle_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--database",
            str(self.database),
            "--log-format",
            "json",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env
        )
        self.stderr_lines = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, args=(self.process,), daemon=True)
        self._stderr_thread.start()
        try:
            return self._await_serving()
        except BaseException:
            self.kill()  # never leave a half-started server behind
            raise

    def _await_serving(self) -> ServerProcess:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited at start: {''.join(self.stderr_lines)[-4000:]}")
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "serving":
                self.serving = message
                self.port = int(message["port"])
                break
        else:
            raise RuntimeError("server did not start in time")
        if "--tls-cert" not in self.extra_args:  # a TLS server is trusted to be ready when it says so
            with grpc.insecure_channel(self.address) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
        return self

    def _drain_stderr(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.stderr_lines.append(line)

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for line in list(self.stderr_lines):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def wait_for_log(
        self, predicate: Callable[[dict[str, object]], bool], timeout: float = 10.0
    ) -> dict[str, object]:
        """The first log line matching `predicate`, waiting for the server to write it."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.log_events():
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError("no such log line")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._close()
        return code

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._close()

    def _close(self) -> None:
        if self.process is not None:
            if self.process.stdout:
                self.process.stdout.close()
            if self._stderr_thread is not None:
                self._stderr_thread.join(timeout=5)
            if self.process.stderr:
                self.process.stderr.close()
        self.process = None
