"""Runs the real `spindle-server` as a child process on 127.0.0.1 with port 0, on a database of
the store under test (SPINDLE_TEST_STORE=sqlite|postgresql; `make test` runs both)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from spindle_server.store.base import Store
from spindle_server.store.sqlite import SqliteStore
from support import postgres

STARTUP_TIMEOUT = 30.0
STORE_ENV = "SPINDLE_TEST_STORE"
STORES = ("sqlite", "postgresql")


def store_under_test() -> str:
    """The store the integration tests run against: sqlite (the default) or postgresql."""
    store = os.environ.get(STORE_ENV, "sqlite").strip().lower() or "sqlite"
    if store not in STORES:
        raise ValueError(f"{STORE_ENV}={store!r}: use one of {', '.join(STORES)}")
    return store


@dataclass(frozen=True, slots=True)
class SqliteDatabase:
    path: Path

    @property
    def argument(self) -> str:
        return str(self.path)


@dataclass(frozen=True, slots=True)
class PostgresDatabase:
    dsn: str

    @property
    def argument(self) -> str:
        return self.dsn


# What a server's --database names: a SQLite file, or a database of its own on the test cluster.
TestDatabase = SqliteDatabase | PostgresDatabase


class Databases:
    """Fresh databases of the store under test: a file in the given folder, or a new database on
    the session's PostgreSQL cluster (`admin`), dropped by `drop_all`."""

    def __init__(self, admin: postgres.Admin | None = None) -> None:
        self.admin = admin
        self._created: list[str] = []

    def new(self, folder: Path, name: str = "spindle") -> TestDatabase:
        if self.admin is None:
            return SqliteDatabase(folder / f"{name}.db")
        dsn = self.admin.create_database()
        self._created.append(postgres.database_name(dsn))
        return PostgresDatabase(dsn)

    def drop_all(self) -> None:
        """Drop what `new` created (after the servers on them stopped: WITH FORCE cuts the rest)."""
        while self.admin is not None and self._created:
            self.admin.drop_database(self._created.pop())


def open_store(database: TestDatabase) -> Store:
    """A store of the test's own on a server's database, for a test that sets up a state no API
    call can (e.g. what a crash leaves behind); call start() and close() on it."""
    if isinstance(database, SqliteDatabase):
        return SqliteStore(database.path)
    # Imported by name: the PostgreSQL store and asyncpg only load where a test needs them.
    module = importlib.import_module("spindle_server.store.postgres")
    store: Store = module.PostgresStore(database.dsn, pool_min=1, pool_max=2)
    return store


def count_rows(database: TestDatabase, table: str, **equal: str) -> int:
    """Rows of `table` whose columns equal the given values, read from the database itself
    (under the API: what is stored, not what a List call shows)."""
    where = " AND ".join(f"{column} = {{}}" for column in equal) or "TRUE"
    if isinstance(database, SqliteDatabase):
        sql = f"SELECT COUNT(*) FROM {table} WHERE " + where.format(*("?" * len(equal)))
        with sqlite3.connect(f"file:{database.path}?mode=ro", uri=True) as db:
            return int(db.execute(sql, tuple(equal.values())).fetchone()[0])
    sql = f"SELECT COUNT(*) FROM {table} WHERE " + where.format(*(f"${i + 1}" for i in range(len(equal))))
    admin = postgres.Admin(database.dsn)  # a loop of its own: callers may be inside one
    try:
        return int(admin.fetchval(sql, *equal.values()))
    finally:
        admin.close()


class ServerProcess:
    def __init__(
        self,
        database: TestDatabase | Path,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.database: TestDatabase = SqliteDatabase(database) if isinstance(database, Path) else database
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        # Kept across start() after kill(): a restarted server is the same replica and takes its
        # own runs over at once (on PostgreSQL too, rather than after their lease ran out).
        self.replica_id = f"test-{uuid.uuid4().hex[:12]}"
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.serving: dict[str, object] = {}  # the server's "serving" line (ports it chose)
        self.stderr_lines: list[str] = []
        self._stderr_thread: threading.Thread | None = None

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file, for the tests that read it (marked sqlite_only)."""
        assert isinstance(self.database, SqliteDatabase), "a sqlite_only test ran on PostgreSQL"
        return self.database.path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        """Launch and wait until it serves (its port open, store and engine up)."""
        self.launch()
        try:
            return self.await_serving()
        except BaseException:
            self.kill()  # never leave a half-started server behind
            raise

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it to serve (see await_serving)."""
        command = [
            sys.executable,
            "-m",
            "spindle_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--database",
            self.database.argument,
            "--log-format",
            "json",
            *self.extra_args,
        ]
        if "--replica-id" not in self.extra_args:
            command += ["--replica-id", self.replica_id]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env
        )
        self.stderr_lines = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, args=(self.process,), daemon=True)
        self._stderr_thread.start()
        return self

    def await_serving(self, timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
        """Read the port from the server's `serving` line; then wait for its channel."""
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
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
