"""Server processes on 127.0.0.1 for the length of a benchmark: a real `spindle-server`
(SQLite or PostgreSQL, builtin model) and the bare grpc.aio baseline, `bench.echo_server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

STOP_SECONDS = 30.0
ROOT = Path(__file__).resolve().parent.parent


class ServedProcess:
    """``with ServedProcess(command) as served:`` starts a server that prints a JSON `serving`
    line with its port, and stops it at the end; `served.address` is where it listens."""

    def __init__(self, command: Sequence[str], log: Path | None = None) -> None:
        self._command = list(command)
        self._log = log
        self._process: subprocess.Popen[str] | None = None
        self.address = ""
        self.serving: dict[str, Any] = {}  # the whole `serving` line (metrics_port...)

    def __enter__(self) -> Self:
        with open(self._log or os.devnull, "ab") as stderr:
            self._process = subprocess.Popen(
                self._command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT
            )
        assert self._process.stdout is not None
        for line in self._process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "serving":
                self.address = f"127.0.0.1:{message['port']}"
                self.serving = message
                return self
        self._stop()
        raise RuntimeError(f"{self._command} did not start")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def _stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None


def spindle_command(database: str, *args: str) -> list[str]:
    """A spindle-server on 127.0.0.1, a free port, `database` (a SQLite file or a PostgreSQL
    DSN), --log-level warning unless a later flag in `args` says otherwise."""
    command = [sys.executable, "-m", "spindle_server", "--host", "127.0.0.1", "--port", "0"]
    return [*command, "--database", database, "--log-level", "warning", *args]


class BenchServer(ServedProcess):
    """``with BenchServer(*flags) as server:`` a spindle-server on a free port, with its own SQLite
    database, or on `postgres` (a DSN) when given."""

    def __init__(self, *args: str, postgres: str | None = None) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="spindle-bench-")
        database = Path(self._folder.name) / "spindle.db"
        self.database = database  # the SQLite file, for a benchmark that counts what was written
        self.log_path = Path(self._folder.name) / "server.log"  # its stderr: the structlog lines
        super().__init__(spindle_command(postgres or str(database), *args), self.log_path)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        self._folder.cleanup()


def echo_server(durable_dir: Path | None = None, postgres: str | None = None) -> ServedProcess:
    """The bare grpc.aio baseline (`bench/echo_server.py`); with `durable_dir`, its floor of a
    durable write too (`Append`, a SQLite file in that folder); with `postgres` (a DSN), its
    floors of a PostgreSQL read and durable write (`PgGet`, `PgAppend`) on that database."""
    flags = [] if durable_dir is None else ["--durable-dir", str(durable_dir)]
    if postgres is not None:
        flags += ["--postgres", postgres]
    return ServedProcess([sys.executable, "-m", "bench.echo_server", *flags])
