"""Another process that holds locks on a server's SQLite database, as real neighbours do.

- `write`: an sqlite3 connection in `BEGIN IMMEDIATE` (a backup script, a migration, the sqlite3
  shell): it holds the WAL write lock, so the server's writes wait and its reads go on.
- `recovering`: a process that is rebuilding the WAL index (what the next opener does after a
  crash): it holds the index's write and recover locks while the index header is not valid.
  Readers then get SQLITE_BUSY_RECOVERY and wait out their busy_timeout: the one lock another
  process can make a WAL reader wait on. When it lets go, the server rebuilds the index from
  the WAL file itself (the data is in the WAL; the index is derived from it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import TracebackType

_WRITE = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
connection.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
"""

# unix VFS layout of the -shm file: two copies of the 48-byte index header at 0 and 48;
# lock bytes from 120: WRITE, CHECKPOINT, RECOVER, READ0..4; DMS at 128.
_RECOVERING = """
import fcntl, mmap, os, sys
fd = os.open(sys.argv[1] + "-shm", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 120)  # WAL write lock (waits for a running write to end)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 122)  # recover lock
index = mmap.mmap(fd, 32768)
saved = index[12]
index[12] = 0  # isInit of the first header copy: the copies differ, the index needs rebuilding
print("held", flush=True)
sys.stdin.readline()
index[12] = saved
index.close()
fcntl.lockf(fd, fcntl.LOCK_UN, 1, 122)
fcntl.lockf(fd, fcntl.LOCK_UN, 1, 120)
"""

SCRIPTS = {"write": _WRITE, "recovering": _RECOVERING}


class LockHolder:
    """`with LockHolder(db, "write"):` holds the lock inside the block (and until release())."""

    def __init__(self, database: Path, kind: str) -> None:
        self.database = database
        self.kind = kind
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> LockHolder:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SCRIPTS[self.kind], str(self.database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "held":
            self.process.kill()
            raise RuntimeError(f"the {self.kind} lock holder did not get its lock")
        return self

    def release(self) -> None:
        if self.process is None:
            return
        assert self.process.stdin is not None
        try:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            assert self.process.wait(timeout=60) == 0
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    stream.close()
            self.process = None

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
