"""A private PostgreSQL cluster for tests and developers, and a fresh database per test.

The cluster lives in a folder of its own (a temporary one for tests, .pg/ for `make pg`),
listens on 127.0.0.1 on a free port and on a unix socket in that folder, trusts local
connections, and is stopped with `pg_ctl stop -m fast`. PostgreSQL refuses to run as root, so as
root initdb and pg_ctl run as the `postgres` user the Debian package creates. Durability is off
(fsync, full_page_writes, synchronous_commit): a test cluster is thrown away, and on a loaded
machine every fsync is time; a crash of PostgreSQL itself is still a real crash to the server.

SPINDLE_TEST_POSTGRES_DSN names a server to use instead of starting one (its user must be allowed
to create databases).

A fresh database is CREATE DATABASE ... TEMPLATE template0 STRATEGY FILE_COPY, about 25 ms with
the cluster in memory (`create_database` has the numbers); a unique schema per test would be
faster still but shares one database's NOTIFY channels and advisory locks, which the store uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

ENV_DSN = "SPINDLE_TEST_POSTGRES_DSN"
OWNER_FILE = "owner.pid"  # in a throw-away cluster's folder: the process whose cluster it is
USER = "postgres"  # the cluster's superuser, and the system user that runs it when we are root
_names = itertools.count()
T = TypeVar("T")

# Every cluster: local TCP only, room for many servers with a pool each plus a LISTEN connection.
SETTINGS = {"listen_addresses": "127.0.0.1", "max_connections": "300", "log_min_messages": "warning"}
# A test cluster is thrown away at the end of the session: no durability, no WAL beyond recovery.
THROWAWAY_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
}


def bindir() -> Path | None:
    """Debian's newest installed PostgreSQL (/usr/lib/postgresql/<version>/bin), else pg_ctl on PATH."""
    versions = [
        path.parent
        for path in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
        if path.parent.parent.name.isdigit()
    ]
    if versions:
        return max(versions, key=lambda path: int(path.parent.name))
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def scratch_dir() -> str | None:
    """Where a throw-away cluster lives: SPINDLE_TEST_PG_DIR, else /dev/shm (memory: creating a
    database there takes a tenth of the time it takes on this machine's disk), else the temp dir."""
    chosen = os.environ.get("SPINDLE_TEST_PG_DIR")
    if chosen:
        return chosen
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def available() -> bool:
    return bool(os.environ.get(ENV_DSN)) or bindir() is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """One PostgreSQL cluster in `root` (created if missing), or a throw-away one in a temporary
    folder (root None): no durability, deleted when stopped."""

    def __init__(self, root: Path | None = None, port: int = 0) -> None:
        found = bindir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self._bin = found
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="spindle-pg-", dir=scratch_dir()))
            self._temporary = True
        else:
            self._temporary = False
        self.root = root
        self.data = self.root / "data"
        self.log = self.root / "postgresql.log"
        self._as_postgres = os.geteuid() == 0
        self.port = port

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def _own(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            user = pwd.getpwnam(USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            os.chmod(self.root, 0o700)

    def init(self) -> None:
        """initdb, unless done before."""
        self._own()
        if not (self.data / "PG_VERSION").exists():
            durability = ["--no-sync"] if self._temporary else []
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                *durability,
            )

    def start(self) -> str:
        """initdb (once), then start on `port` or a free one; the superuser DSN."""
        self.init()
        if self._temporary:
            (self.root / OWNER_FILE).write_text(str(os.getpid()))
        for attempt in range(5):  # a free port can be taken between the probe and the start
            if attempt or not self.port:
                self.port = free_port()
            settings = {
                **SETTINGS,
                **(THROWAWAY_SETTINGS if self._temporary else {}),
                "port": str(self.port),
                "unix_socket_directories": str(self.root),
            }
            options = " ".join(f"-c {name}={value}" for name, value in settings.items())
            started = self._run(
                "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start", check=False
            )
            if started.returncode == 0:
                return self.dsn
        raise RuntimeError(f"PostgreSQL did not start; see {self.log}")

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def stop(self, mode: str = "fast", *, keep: bool = False) -> None:
        """Stop the cluster (fast: open connections are cut, immediate: a crash). A temporary
        cluster is deleted unless `keep` (to start it again, on the same port)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)
        if self._temporary and not keep:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def server_dsn() -> Iterator[str]:
    """The superuser DSN of a PostgreSQL server for the test session, stopped at the end."""
    dsn = os.environ.get(ENV_DSN)
    if dsn:
        yield dsn
        return
    reap_orphans()
    cluster = Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def reap_orphans() -> None:
    """Stop and delete throw-away clusters whose test session died without stopping them
    (SIGKILL, a lost machine session): only folders this module made, of owners no longer alive."""
    for owner in Path(scratch_dir() or tempfile.gettempdir()).glob(f"spindle-pg-*/{OWNER_FILE}"):
        try:
            pid = int(owner.read_text())
            os.kill(pid, 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        orphan = Cluster(owner.parent)
        orphan._temporary = True  # delete it once stopped
        orphan.stop("immediate")


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def fresh_name() -> str:
    return f"spindle_test_{os.getpid()}_{next(_names)}_{uuid.uuid4().hex[:6]}"


class Admin:
    """A superuser connection for CREATE/DROP DATABASE, callable from sync code and from inside a
    running event loop alike (tests call it from both): it has an event loop on a thread of its own."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-admin", daemon=True)
        self._thread.start()
        self._conn: Any = None

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=120)

    async def _execute(self, sql: str) -> None:
        import asyncpg  # the server extra's dependency; only PostgreSQL tests need it

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn)
        await self._conn.execute(sql)

    def execute(self, sql: str) -> None:
        self._call(self._execute(sql))

    async def _fetchval(self, sql: str, *args: object) -> Any:
        if self._conn is None or self._conn.is_closed():
            await self._execute("SELECT 1")
        return await self._conn.fetchval(sql, *args)

    def fetchval(self, sql: str, *args: object) -> Any:
        return self._call(self._fetchval(sql, *args))

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its DSN.

        Measured on the loaded 2-core test machine, cluster in /dev/shm, median of 20: STRATEGY
        FILE_COPY 26 ms, PostgreSQL 15's default WAL_LOG 51 ms (it writes the template's pages
        through the WAL), DROP 11 ms; with the cluster on disk both take 350-400 ms. A schema
        per test takes 2 ms but would share NOTIFY channels and advisory locks between tests.
        """
        name = name or fresh_name()
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        return with_database(self.dsn, name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._call(self._conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")
