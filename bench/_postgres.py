"""A private PostgreSQL cluster for the length of a benchmark, started and stopped by the benchmark
itself (tests/support/postgres.py's cluster, which the tests start too), and the CPU it used."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import _mode
from bench._server import ROOT
from bench.load import cpu_seconds

sys.path.insert(0, str(ROOT / "tests"))  # support.postgres importable from here on
from support import postgres

__all__ = ["Cluster", "available", "postgres"]


def available() -> bool:
    """PostgreSQL is installed here (CI installs it; a developer's machine may not have it)."""
    return postgres.bindir() is not None


class Cluster:
    """A private PostgreSQL cluster in a temporary folder on disk, durable (fsync on): the same
    footing as the SQLite server's synchronous=FULL file. Deleted when stopped. A smoke run, whose
    figures are thrown away, takes the tests' cluster instead (in memory, no fsync): it starts
    and creates databases faster."""

    def __init__(self) -> None:
        self._folder: Path | None = None
        if _mode.SMOKE:
            self.cluster = postgres.Cluster()
        else:
            self._folder = Path(tempfile.mkdtemp(prefix="spindle-bench-pg-"))
            os.chmod(self._folder, 0o755)  # the postgres user walks into it when we are root
            self.cluster = postgres.Cluster(self._folder / "cluster")
        self.admin: postgres.Admin | None = None

    def __enter__(self) -> Cluster:
        try:
            self.admin = postgres.Admin(self.cluster.start())
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        self.cluster.stop()  # a temporary one deletes itself
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def database(self) -> str:
        assert self.admin is not None
        return self.admin.create_database(postgres.fresh_name().replace("spindle_test", "bench"))

    def cpu_seconds(self) -> float:
        """CPU of the whole cluster so far: the postmaster, its live backends, and the backends
        that ended (the kernel adds a reaped child's time to its parent's cutime/cstime)."""
        pid = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        total = _cpu_with_children(pid)
        for child in _children(pid):
            with contextlib.suppress(OSError):
                total += cpu_seconds(child)
        return total

    def version(self) -> str:
        """The server's version, e.g. "15.18"."""
        assert self.admin is not None
        return str(self.admin.fetchval("SHOW server_version")).split()[0]


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == parent:
                    found.append(int(entry.name))
    return found


def _cpu_with_children(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def installed_version() -> str:
    """The installed server's version ("15.18"), without starting it."""
    found = postgres.bindir()
    assert found is not None, "PostgreSQL is not installed"
    answer = subprocess.run(
        [str(found / "postgres"), "--version"], capture_output=True, text=True, timeout=30
    )
    return answer.stdout.split(")", 1)[-1].split()[0]
