"""A real `spindle-server` (SQLite, builtin model) on 127.0.0.1 for the length of a benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

STARTUP_SECONDS = 30.0


class BenchServer:
    """``with BenchServer() as server:`` starts the server on a free port and stops it at the end."""

    def __init__(self, *args: str) -> None:
        self._args = args
        self._folder = tempfile.TemporaryDirectory(prefix="spindle-bench-")
        self._process: subprocess.Popen[str] | None = None
        self.address = ""

    def __enter__(self) -> BenchServer:
        database = Path(self._folder.name) / "spindle.db"
        command = [sys.executable, "-m", "spindle_server", "--host", "127.0.0.1", "--port", "0"]
        command += ["--database", str(database), "--log-level", "warning", *self._args]
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self._process.stdout is not None
        for line in self._process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "serving":
                self.address = f"127.0.0.1:{message['port']}"
                return self
        raise RuntimeError("the server did not start")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=STARTUP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
        self._folder.cleanup()
