"""Storage faults against the real server: another process locking the database, and a full
disk. Calls get UNAVAILABLE with a reason that says why, the event loop never waits on a lock,
nothing is corrupted, runs are not stranded, and everything recovers once the fault is gone.

Health stays SERVING through a storage fault: reads still work, each failing call says why
(UNAVAILABLE is retryable), and a NOT_SERVING would only make orchestrators restart or drain
the one process that owns the file, which cures neither a lock held elsewhere nor a full disk.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import assistant_pb2, run_pb2, thread_pb2
from support.faults import Holds
from support.invariants import History, assert_invariants
from support.server import ServerProcess
from support.sqlite_locks import LockHolder
from support.stubs import Stubs, error_details

MakeServer = Callable[..., ServerProcess]
SERVING = health_pb2.HealthCheckResponse.SERVING


def health(stubs: Stubs) -> int:
    return health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(), timeout=60).status


def unavailable_reason(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    info, _ = error_details(caught.value)
    assert info is not None and info.domain == "spindle.v1"
    return info.reason


def integrity(database: Path) -> str:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


def listen_all(stubs: Stubs, run_id: str, history: History) -> None:
    """Follows a run to its end (or its TOOL_CALLS) into `history`, reconnecting after errors."""
    seen = history.listener(run_id)
    for _ in range(200):
        start = seen.events[-1].index + 1 if seen.events else 0
        try:
            request = run_pb2.ListenRunRequest(run_id=run_id, events_start_idx=start)
            for event in stubs.runs.Listen(request, timeout=120):
                seen.events.append(event)
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise


FIRST_DELTA = "store.after_mutate:IN_PROGRESS"


def hold_first_delta(tmp_path: Path) -> tuple[Holds, dict[str, str]]:
    """Holds a run right after its first streamed delta commits (later ones pass)."""
    holds = Holds(tmp_path / "holds")
    for nth in range(2, 2000):
        holds.release(FIRST_DELTA, nth)
    return holds, holds.env(FIRST_DELTA)


@pytest.mark.sqlite_only("another process holds SQLite's file lock")
def test_a_busy_database_never_stalls_the_event_loop(make_server: MakeServer) -> None:
    """Defect 4a: a key lookup that meets a busy database goes to the reader pool (which may
    wait); the event loop goes on answering. Ordered by events, not by time: the lookup is
    known to have met the lock (its log line) before health is asked, and the lock is held
    until health has answered."""
    server = make_server()
    stubs = Stubs.connect(server.address)
    try:
        assistant = stubs.assistant(name="kept")
        get = assistant_pb2.GetAssistantRequest(assistant_id=assistant.id)
        with concurrent.futures.ThreadPoolExecutor(1) as pool, LockHolder(server.sqlite_path, "recovering"):
            lookup = pool.submit(stubs.assistants.Get, get, timeout=60)
            server.wait_for_log(lambda e: e.get("event") == "sqlite_inline_read_busy", timeout=60)
            assert health(stubs) == SERVING  # answered while the lock is held
        # The lookup waited in the pool: it answers, or (if the lock outlived busy_timeout)
        # says the database was busy; never INTERNAL.
        try:
            assert lookup.result(timeout=60) == assistant
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error_details(error)[0].reason == "STORAGE_BUSY"  # type: ignore[union-attr]
        assert stubs.assistants.Get(get, timeout=10) == assistant
        assert stubs.assistant(name="after").name == "after"
    finally:
        stubs.close()
    assert server.stop() == 0
    assert integrity(server.sqlite_path) == "ok"


@pytest.mark.sqlite_only("another process holds SQLite's file lock")
def test_run_get_that_meets_a_busy_database_reads_in_the_pool(make_server: MakeServer) -> None:
    """RunService.Get reads on the event loop's connection without a coroutine of its own
    (SqliteStore.get_run_body): when that read meets the lock, the same Get is read in the
    reader pool and answers the stored run (or STORAGE_BUSY), never INTERNAL, and the loop
    goes on answering meanwhile. Ordered by events, as the test above."""
    server = make_server()
    stubs = Stubs.connect(server.address)
    try:
        run = stubs.wait(stubs.start("hello").id)
        get = run_pb2.GetRunRequest(run_id=run.id)
        # Wait read the run and kept it in memory; any write empties that cache (sqlite_cache),
        # so this Get reads the file.
        stubs.thread("a write")
        with concurrent.futures.ThreadPoolExecutor(1) as pool, LockHolder(server.sqlite_path, "recovering"):
            lookup = pool.submit(stubs.runs.Get, get, timeout=60)
            server.wait_for_log(lambda e: e.get("event") == "sqlite_inline_read_busy", timeout=60)
            assert health(stubs) == SERVING
        try:
            assert lookup.result(timeout=60) == run
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error_details(error)[0].reason == "STORAGE_BUSY"  # type: ignore[union-attr]
        assert stubs.runs.Get(get, timeout=10) == run
    finally:
        stubs.close()
    assert server.stop() == 0


@pytest.mark.sqlite_only("another process holds SQLite's file lock")
def test_database_locked_by_another_process(make_server: MakeServer, tmp_path: Path) -> None:
    holds, env = hold_first_delta(tmp_path)
    server = make_server("--lease-seconds", "2", env=env)
    stubs = Stubs.connect(server.address)
    history = History()
    try:
        assistant = stubs.assistant(name="kept")
        run = stubs.start("/sleep 1 " + " ".join(f"w{i}" for i in range(40)), assistant)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            listening = pool.submit(listen_all, stubs, run.id, history)
            holds.wait_reached(FIRST_DELTA)
            with LockHolder(server.sqlite_path, "write"):
                holds.release(FIRST_DELTA)  # the run's next write meets the lock
                server.wait_for_log(lambda e: e.get("event") == "run_execution_store_unavailable", 60)
                # Writes wait busy_timeout, then say why; nothing half-written.
                create = thread_pb2.CreateThreadRequest()
                reason = unavailable_reason(lambda: stubs.threads.Create(create, timeout=60))
                assert reason == "STORAGE_BUSY"
                # Reads and health go on (WAL readers do not wait for the writer).
                get = assistant_pb2.GetAssistantRequest(assistant_id=assistant.id)
                assert stubs.assistants.Get(get, timeout=10) == assistant
                assert health(stubs) == SERVING
            # Recovery: writes work again and the run (its writes failed meanwhile) finishes.
            thread = stubs.thread("after the lock")
            assert stubs.threads.Get(thread_pb2.GetThreadRequest(thread_id=thread.id), timeout=10) == thread
            listening.result(timeout=120)
        finals = assert_invariants(stubs, [run.id], history)
        assert finals[run.id].run.status == run_pb2.COMPLETED
    finally:
        stubs.close()
    assert server.stop() == 0
    assert integrity(server.sqlite_path) == "ok"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 24 MiB file system (tmpfs), unmounted afterwards; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Writes a file until the file system is full; deleting it gives the space back."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 512)
    return filler


@pytest.mark.sqlite_only("the SQLite file on a full tmpfs")
def test_disk_full(make_server: MakeServer, small_disk: Path, tmp_path: Path) -> None:
    database = small_disk / "spindle.db"
    holds, env = hold_first_delta(tmp_path)
    server = make_server("--lease-seconds", "2", database=database, env=env)
    stubs = Stubs.connect(server.address)
    history = History()
    big = "x" * 100_000
    try:
        assistant = stubs.assistant(name="kept")
        done = stubs.start("before the disk fills", assistant)
        stubs.wait(done.id)
        run = stubs.start("/sleep 1 " + " ".join(f"w{i}" for i in range(40)), assistant)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            listening = pool.submit(listen_all, stubs, run.id, history)
            holds.wait_reached(FIRST_DELTA)
            filler = fill(small_disk)
            # Writes fail as soon as SQLite needs a page it cannot have (the WAL may still
            # have room for a few): bounded by the disk's size, each failure says why.
            reason = ""
            for _ in range(1000):
                try:
                    stubs.thread(big)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    reason = error_details(error)[0].reason  # type: ignore[union-attr]
                    break
            assert reason == "STORAGE_FULL"
            assert unavailable_reason(lambda: stubs.thread(big)) == "STORAGE_FULL"
            get = assistant_pb2.GetAssistantRequest(assistant_id=assistant.id)
            assert stubs.assistants.Get(get, timeout=10) == assistant  # reads go on
            assert health(stubs) == SERVING
            holds.release(FIRST_DELTA)  # the run streams on into the full disk
            os.unlink(filler)  # space is back
            thread = stubs.thread(big)
            assert stubs.threads.Get(thread_pb2.GetThreadRequest(thread_id=thread.id), timeout=10) == thread
            listening.result(timeout=120)
        finals = assert_invariants(stubs, [done.id, run.id], history)
        assert finals[run.id].run.status == run_pb2.COMPLETED
    finally:
        stubs.close()
    assert server.stop() == 0
    assert integrity(database) == "ok"
