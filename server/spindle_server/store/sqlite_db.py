"""SQLite plumbing: one writer thread that commits in batches, a small pool of readers.

Writes are functions of a connection, queued to the writer thread. It runs every write that is
waiting in one transaction (each under its own SAVEPOINT, so one failing write does not undo
the others), commits once with synchronous=FULL, and only then answers the callers: many
concurrent writes cost one fsync. Readers use their own connections; WAL lets them read while
the writer writes.

Every SQLite failure leaves here as an UnavailableError whose reason says why (busy, full,
other): callers answer UNAVAILABLE, never INTERNAL, and nothing of the failed call is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from spindle_server import faults, metrics
from spindle_server.store.errors import (
    STORAGE_BUSY,
    STORAGE_FULL,
    STORAGE_UNAVAILABLE,
    StoreError,
    UnavailableError,
)
from spindle_server.store.sqlite_cache import BodyCache

T = TypeVar("T")
log = structlog.get_logger(__name__)

MAX_BATCH = 256
WRITER_STATEMENTS = 1024
# The WAL is folded into the database every WAL_AUTOCHECKPOINT pages (SQLite's default, made
# explicit), and when it restarts from the top its file is cut back to JOURNAL_SIZE_LIMIT: so the
# WAL file stays near max(limit, autocheckpoint pages + one batch) instead of keeping its peak.
WAL_AUTOCHECKPOINT_PAGES = 1000
JOURNAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
# A TRUNCATE checkpoint waits at most this long for the writer or readers, then gives up.
CHECKPOINT_BUSY_MS = 100
_STOP = object()

# Primary result codes (the low byte of an extended code).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13


def _primary_code(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED)


# Less free space than this where the database lives: an I/O error is taken for a full disk
# (growing the WAL index on a full disk is SQLITE_IOERR_SHMSIZE, not SQLITE_FULL).
_NEARLY_FULL_BYTES = 1 << 20


def _disk_nearly_full(path: Path | None) -> bool:
    if path is None:
        return False
    try:
        stat = os.statvfs(path.parent)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _NEARLY_FULL_BYTES


def unavailable(exc: sqlite3.Error, what: str, path: Path | None = None) -> UnavailableError:
    """The UnavailableError for an SQLite failure, with the reason a caller can act on."""
    code = _primary_code(exc)
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        reason = STORAGE_BUSY
        cause = "the database is locked by another process"
    elif code == _SQLITE_FULL or _disk_nearly_full(path):
        reason, cause = STORAGE_FULL, "the disk is full"
    else:
        reason, cause = STORAGE_UNAVAILABLE, "storage error"
    return UnavailableError(f"database {what} failed: {cause} ({exc})", reason)


@dataclass(slots=True)
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    after_commit: Callable[[Any], None] | None
    # A write of rows (write_row): runs with the writes next to it that have the same `merge`.
    merge: Merge | None = None
    row: Any = None
    # Names the fault point `sqlite.after_commit:FAULT` this write reaches once committed (tests).
    fault: str = ""


# Runs the rows of consecutive writes of one kind as one statement (a multi-row INSERT) and
# says each one's outcome. That statement is the only change it makes, so it needs no SAVEPOINT
# (SQLite undoes a failed statement by itself): it raises only when nothing of it was written,
# or when the error ended the batch's transaction.
Merge = Callable[[sqlite3.Connection, list[Any]], list[tuple[bool, Any]]]


class SqliteDatabase:
    def __init__(self, path: Path, *, readers: int = 4, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        # The writer's queue holds lists of writes: those one turn of the event loop asked for.
        self._queue: queue.SimpleQueue[list[_Write] | object] = queue.SimpleQueue()
        self._pending: list[_Write] = []  # this turn's writes, handed over by _hand_over
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="sqlite-read")
        self._local = threading.local()
        self._inline: sqlite3.Cursor | None = None  # read_rows_now's, on the event loop's connection
        self._reader_connections: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._lock_file: Any = None
        self._closing = False
        self.batches = 0
        # Stored bodies the event loop may answer from memory: kept coherent by the writer
        # thread, which every change to the file goes through (see sqlite_cache).
        self.cache = BodyCache()

    def open(self, schema: str) -> None:
        """Take the single-owner lock, set the pragmas, create the schema, start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_ownership()
        self._loop = asyncio.get_running_loop()
        # The writer's statements stay prepared: a batch's multi-row INSERT has one text per
        # row count (write_row), beyond sqlite3's default cache of 128.
        connection = self._connect(cached_statements=WRITER_STATEMENTS)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        connection.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
        connection.executescript(schema)
        self._writer = threading.Thread(target=self._write_loop, args=(connection,), name="sqlite-writer")
        self._writer.daemon = True
        self._writer.start()

    def _take_ownership(self) -> None:
        """One process owns the file (DESIGN.md, Storage): the writer thread is the only way in,
        which the cache of bodies relies on. A second server (or anything else opening it with
        this class) is refused here, at start, rather than sharing the file.

        The lock is a flock on a file of its own next to the database, `<db>.lock`, held
        for the database's life (released by close(), or by the kernel when the process dies,
        kill -9 included). Not a lock on the database file itself: SQLite takes POSIX (fcntl)
        locks on it, and closing any descriptor of a file drops all of the process's POSIX
        locks on that file, so a descriptor of ours on the database would be one more way
        to lose SQLite's locks. flock locks are apart from fcntl ones, and on a file SQLite
        never opens they cannot meet its locks: other processes (the sqlite3 shell, backups,
        the tests' read-only checks) still open the database as SQLite allows."""
        lock_path = Path(str(self.path) + ".lock")
        lock_file = open(lock_path, "a+")  # noqa: SIM115 - held until close(); "a+": not truncated
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock_file.seek(0)
            owner = lock_file.read().strip()
            lock_file.close()
            pid = f" (pid {owner})" if owner.isdigit() else ""
            raise UnavailableError(
                f"database {self.path} is owned by another running server{pid}, which holds"
                f" {lock_path}: one process owns a SQLite file; stop it or use another --database"
            ) from exc
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        self._lock_file = lock_file

    async def close(self) -> None:
        # Refuse new work first: a write queued behind _STOP would never be answered, and a
        # read after the pool's shutdown would be a RuntimeError (INTERNAL) for its caller.
        self._closing = True
        # And nothing answered from memory: once the lock below is let go, another process
        # may own the file.
        self.cache.close()
        if self._writer is not None:
            self._hand_over()  # the writes asked for in this turn go before _STOP
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        await asyncio.to_thread(self._readers.shutdown, wait=True)
        with self._reader_lock:
            for connection in self._reader_connections:
                connection.close()
            self._reader_connections.clear()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def checkpoint(self) -> bool:
        """Fold the whole WAL into the database and truncate it to zero bytes, on a connection of
        its own (the writer runs everything in a transaction, where a checkpoint cannot run).
        True if it went through; False if the writer or a reader was busy past
        CHECKPOINT_BUSY_MS (the next call tries again)."""
        if self._closing:
            raise UnavailableError("the database is closed")

        def run() -> bool:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                connection.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
                busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                return busy == 0
            except sqlite3.OperationalError:
                return False
            finally:
                connection.close()

        return await asyncio.to_thread(run)

    def _connect(
        self, busy_timeout_ms: int | None = None, cached_statements: int = 128
    ) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, cached_statements=cached_statements
        )
        timeout = self._busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
        connection.execute(f"PRAGMA busy_timeout={timeout}")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute("PRAGMA temp_store=MEMORY")
        return connection

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        after_commit: Callable[[T], None] | None = None,
        *,
        fault: str = "",
    ) -> T:
        """Run `fn` in the next batch; `after_commit(result)` runs in the loop before the caller
        resumes. `fault`: the qualifier of the fault point `sqlite.after_commit` (tests)."""
        return await self._enqueue(_Write(fn, self._future(), after_commit, fault=fault))

    def write_row(self, merge: Merge, row: Any) -> asyncio.Future[Any]:
        """Write `row` in the next batch with `merge` (see Merge), in one statement with the
        rows of the writes queued next to it with the same `merge`; to await: its outcome's value.

        The writer thread runs each statement with the interpreter lock released and must
        take it back from the busy event loop after it: a batch of N such writes is one
        statement instead of N, each with a SAVEPOINT and its RELEASE (BENCHMARKS.md,
        rpc-speed: a durable MessageService.Create). Not a coroutine: the caller awaits the
        write's future itself, one coroutine fewer on every durable Create."""
        future = self._future()
        self._queued(_Write(_no_fn, future, None, merge, row))
        return future

    def _future(self) -> asyncio.Future[Any]:
        if self._closing or self._writer is None or self._loop is None:
            raise UnavailableError("the database is closed")
        return self._loop.create_future()

    async def _enqueue(self, write: _Write) -> Any:
        self._queued(write)
        return await write.future

    def _queued(self, write: _Write) -> None:
        assert self._loop is not None
        self._pending.append(write)
        if len(self._pending) == 1:
            self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """Gives the writer the writes this turn of the event loop asked for, in one piece:
        calls that arrived together commit together (when the writer is idle it would start a
        commit with the first and leave the rest to the next one), and the writer is woken
        once a turn, not once a write."""
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one read transaction (one snapshot) on a connection of the reader pool."""
        if self._closing:
            raise UnavailableError("the database is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_in_pool, fn)

    async def read_row(self, sql: str, args: tuple[Any, ...]) -> Any:
        """The first row of one SELECT (None if it finds none): lookups by key, every Get."""
        rows = self.read_rows_now(sql, args)
        if rows is None:
            rows = await self.read_rows_in_pool(sql, args)
        return rows[0] if rows else None

    async def read_rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        """Every row of one SELECT: lookups by key (every Get) and a run's few rows (its
        thread's messages and its steps, read by each turn). On the event loop's connection
        (`read_rows_now`), in the reader pool when the database is busy."""
        rows = self.read_rows_now(sql, args)
        if rows is None:
            rows = await self.read_rows_in_pool(sql, args)
        return rows

    def read_rows_now(self, sql: str, args: tuple[Any, ...]) -> list[Any] | None:
        """Every row of one SELECT, read at once on the event loop's own thread, or None if the
        database is busy (the caller then awaits `read_rows_in_pool`, whose connections may
        wait). Not a coroutine: the hottest read (RunService.Get) costs no coroutine of its own.

        Such a read takes a few microseconds and a hop to the reader pool costs more than the
        query (BENCHMARKS.md, rpc-speed). That connection never waits for a lock (busy_timeout
        0), since waiting there would stall every call of the server. No BEGIN/COMMIT around
        it: one statement in autocommit is its own read transaction, so its rows come from one
        snapshot, and each read begins a new one (it sees every commit before it). Its rows
        are fetched to the end, which resets the statement and so ends that transaction (a
        statement left mid-way would keep its snapshot open and hold back checkpoints). One
        cursor is kept for it: no cursor object per read."""
        if self._closing:
            raise UnavailableError("the database is closed")
        try:
            cursor = self._inline
            if cursor is None:  # opened here, inside the try: its PRAGMAs can meet a busy file
                cursor = self._inline = self._reader(busy_timeout_ms=0).cursor()
            return cursor.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                raise unavailable(exc, "read", self.path) from exc
            log.info("sqlite_inline_read_busy", error=str(exc))
        return None

    async def read_rows_in_pool(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        """`read_rows` on a connection of the reader pool (it may wait out a lock)."""
        if self._closing:
            raise UnavailableError("the database is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._rows_in_pool, sql, args)

    def _rows_in_pool(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        return self._read_in_pool(lambda connection: connection.execute(sql, args).fetchall())

    def _read_in_pool(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._local.connection = self._reader()
            return _in_read_transaction(connection, fn)
        except sqlite3.Error as exc:
            raise unavailable(exc, "read", self.path) from exc

    def _reader(self, busy_timeout_ms: int | None = None) -> sqlite3.Connection:
        connection = self._connect(busy_timeout_ms)
        connection.execute("PRAGMA query_only=ON")
        with self._reader_lock:
            self._reader_connections.append(connection)
        return connection

    def _write_loop(self, connection: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            batch: list[_Write] = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, list)
                batch.extend(item)  # one turn's writes stay together (MAX_BATCH may be passed by them)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self.cache.writing()  # before anything of the batch runs; `_answer` ends it
                busy = self._commit_batch(connection, batch)
                if busy is not None:
                    stopping = self._fail_queued(busy) or stopping
        connection.close()

    def _fail_queued(self, failure: UnavailableError) -> bool:
        """Fails the writes queued while a lock held elsewhere was waited for: they would wait
        as long again, so a write's wait stays one busy_timeout. True if _STOP was among them."""
        failed: list[_Write] = []
        stop = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
            else:
                assert isinstance(item, list)
                failed.extend(item)
        if failed:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._deliver, failed, [(False, failure)] * len(failed))
        return stop

    def _commit_batch(self, connection: sqlite3.Connection, batch: list[_Write]) -> UnavailableError | None:
        """Commits the batch and answers its callers; returns the failure if the database was busy."""
        outcomes: list[tuple[bool, Any]] = []
        busy: UnavailableError | None = None
        began = time.perf_counter()
        try:
            if connection.in_transaction:
                # A failed COMMIT whose ROLLBACK failed too: without this, every later batch
                # would fail on "cannot start a transaction within a transaction".
                connection.execute("ROLLBACK")
            groups = _groups(batch)
            merge, writes = groups[0]
            if len(groups) == 1 and merge is not None:
                # Rows of one kind alone: their statement runs in autocommit, its own
                # transaction, committed (synchronous=FULL: on disk) before it returns. Two
                # statements fewer than BEGIN ... COMMIT; under a light load most batches are
                # one call's write. An SQLite error leaves _run_rows (no transaction is open)
                # and fails them as a failed COMMIT does.
                outcomes.extend(_run_rows(connection, merge, writes, self.path))
                return self._answer(batch, outcomes, began, busy)
            if len(batch) == 1:
                # One write alone: the transaction is its own, no SAVEPOINT around it (two
                # statements fewer, each a hand-back of the interpreter lock by this thread).
                outcomes.append(_run_alone(connection, batch[0], self.path))
                return self._answer(batch, outcomes, began, busy)
            connection.execute("BEGIN IMMEDIATE")
            for merge, writes in groups:
                if merge is not None:
                    outcomes.extend(_run_rows(connection, merge, writes, self.path))
                    continue
                (write,) = writes
                connection.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, write.fn(connection)))
                    connection.execute("RELEASE op")
                except Exception as exc:  # the caller gets it; the rest of the batch goes on
                    connection.execute("ROLLBACK TO op")
                    connection.execute("RELEASE op")
                    outcomes.append((False, _write_failure(exc, self.path)))
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            log.error("sqlite_commit_failed", error=str(exc), writes=len(batch))
            failure = unavailable(exc, "write", self.path)
            outcomes = [(False, failure)] * len(batch)
            busy = failure if _is_busy(exc) else None
        return self._answer(batch, outcomes, began, busy)

    def _answer(
        self,
        batch: list[_Write],
        outcomes: list[tuple[bool, Any]],
        began: float,
        busy: UnavailableError | None,
    ) -> UnavailableError | None:
        if faults.ENABLED:  # committed, not yet known to the loop: Gets must read the file
            for write, (ok, _) in zip(batch, outcomes, strict=True):
                if ok and write.fault:
                    faults.reached_sync(f"sqlite.after_commit:{write.fault}")
        # Before anyone is told of the batch (its callers, listeners): the cache is emptied
        # and answers again. A batch that failed is a change too (coarse, never wrong).
        self.cache.written()
        self.batches += 1
        metrics.record_commit(began, len(batch))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, batch, outcomes)
        return busy

    @staticmethod
    def _deliver(batch: list[_Write], outcomes: list[tuple[bool, Any]]) -> None:
        # Post-commit hooks first (they wake listeners), then the callers, all in commit order.
        for write, (ok, value) in zip(batch, outcomes, strict=True):
            if ok and write.after_commit is not None:
                try:
                    write.after_commit(value)
                except Exception:
                    log.exception("after_commit_failed")
        for write, (ok, value) in zip(batch, outcomes, strict=True):
            if write.future.done():
                continue
            if ok:
                write.future.set_result(value)
            else:
                write.future.set_exception(value)


def _run_alone(connection: sqlite3.Connection, write: _Write, path: Path) -> tuple[bool, Any]:
    """A batch's only write in its own transaction, committed; its failure undoes all of it. An
    SQLite error of BEGIN, COMMIT or the ROLLBACK leaves (the batch fails as a failed COMMIT)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        value = write.fn(connection)
    except Exception as exc:  # the caller gets it
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        return False, _write_failure(exc, path)
    connection.execute("COMMIT")
    return True, value


def _write_failure(exc: Exception, path: Path) -> Exception:
    """What a write's caller gets for its failure: an SQLite operational error (disk full, I/O:
    not a bug) as the store being unavailable, any other as it is. A refusal (StoreError: no
    such thread, an active run) is an answer, not a fault: it leaves without its traceback,
    whose frames (the writer's, holding the whole batch, the refusal among its outcomes) would
    make a cycle that keeps every write of the batch until a full pass of the collector."""
    if isinstance(exc, sqlite3.OperationalError):
        return unavailable(exc, "write", path)
    if isinstance(exc, StoreError):
        return exc.with_traceback(None)
    return exc


def _no_fn(connection: sqlite3.Connection) -> None:
    raise AssertionError("a write of rows runs through its merge")


def _groups(batch: list[_Write]) -> list[tuple[Merge | None, list[_Write]]]:
    """The batch in order, consecutive writes of rows with one merge together, others alone."""
    groups: list[tuple[Merge | None, list[_Write]]] = []
    for write in batch:
        if write.merge is not None and groups and groups[-1][0] is write.merge:
            groups[-1][1].append(write)
        else:
            groups.append((write.merge, [write]))
    return groups


def _run_rows(
    connection: sqlite3.Connection, merge: Merge, writes: list[_Write], path: Path
) -> list[tuple[bool, Any]]:
    """The outcomes of writes of rows. A failed statement is undone by SQLite itself and the
    batch's transaction goes on; an error that ended the transaction (SQLite rolls the whole
    transaction back on some I/O and full-disk errors; in autocommit none is open) leaves,
    failing the whole batch as a failed COMMIT does, since what went before is gone too."""
    try:
        outcomes = merge(connection, [write.row for write in writes])
        return [(ok, value if ok else _write_failure(value, path)) for ok, value in outcomes]
    except Exception as exc:  # the callers get it; the rest of the batch goes on
        if isinstance(exc, sqlite3.Error) and not connection.in_transaction:
            raise
        return [(False, _write_failure(exc, path))] * len(writes)


def _in_read_transaction(connection: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """`fn` in one read transaction (one snapshot); ended even if `fn` or BEGIN's read fails."""
    connection.execute("BEGIN")
    try:
        return fn(connection)
    finally:
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("COMMIT")
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
