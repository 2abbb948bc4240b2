"""A private PostgreSQL cluster for tests: SPINDLE_TEST_POSTGRES_DSN if set, else one started here.

The cluster lives in a temporary folder, listens on 127.0.0.1 on a free port and on a unix
socket in that folder, and is stopped at the end. initdb refuses to run as root, so as root it
runs as the `postgres` user (the Debian package's); as anyone else, as that user.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ENV_DSN = "SPINDLE_TEST_POSTGRES_DSN"
_names = itertools.count()


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


def available() -> bool:
    return bool(os.environ.get(ENV_DSN)) or _bindir() is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    def __init__(self) -> None:
        bindir = _bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (no pg_ctl)")
        self._bin = bindir
        self._root = Path(tempfile.mkdtemp(prefix="spindle-pg-"))
        self._data = self._root / "data"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self._root, user.pw_uid, user.pw_gid)
        self.port = 0

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120, cwd=self._root)

    def start(self) -> str:
        self._run("initdb", "-D", str(self._data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        for _ in range(5):  # a free port can be taken between the probe and the start
            self.port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={self.port}"
                f" -c unix_socket_directories={self._root} -c max_connections=200"
            )
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self._data),
                    "-o",
                    options,
                    "-l",
                    str(self._root / "log"),
                    "-w",
                    "start",
                )
                return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
            except subprocess.CalledProcessError:
                continue
        raise RuntimeError(f"PostgreSQL did not start; see {self._root / 'log'}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self._root, ignore_errors=True)


@contextlib.contextmanager
def server_dsn() -> Iterator[str]:
    """The DSN of a PostgreSQL server for the test session."""
    dsn = os.environ.get(ENV_DSN)
    if dsn:
        yield dsn
        return
    cluster = Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def fresh_name() -> str:
    return f"spindle_test_{os.getpid()}_{next(_names)}_{uuid.uuid4().hex[:6]}"
