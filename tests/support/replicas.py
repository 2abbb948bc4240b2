"""Several real servers side by side, and which of them answered which calls (their access logs).

Each replica gets its database from ``database(index)``: a SQLite file of its own
(``own_sqlite``), or one PostgreSQL database shared by all (``shared``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support.server import Databases, ServerProcess, TestDatabase, store_under_test

# Every call is in the access log at debug level (errors and slow calls also at info).
DEBUG_LOG = ("--log-level", "debug")


def own_sqlite(directory: Path) -> Callable[[int], Path]:
    """A SQLite file per replica, in ``directory``."""
    return lambda index: directory / f"replica{index}.db"


def shared(database: TestDatabase) -> Callable[[int], TestDatabase]:
    """The same database for every replica (PostgreSQL: what replicas are for)."""
    return lambda index: database


def for_store_under_test(directory: Path, databases: Databases) -> Callable[[int], TestDatabase | Path]:
    """PostgreSQL: one fresh database shared by all; SQLite: a file each in ``directory``."""
    if store_under_test() == "postgresql":
        return shared(databases.new(directory))
    return own_sqlite(directory)


@contextlib.contextmanager
def replicas(
    database: Callable[[int], TestDatabase | Path],
    count: int = 3,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | Callable[[int], dict[str, str]] | None = None,
) -> Iterator[list[ServerProcess]]:
    """Start ``count`` servers (access log at debug level); all are killed on the way out.
    ``env`` is the same for all, or ``env(index)`` each its own (e.g. a fault-point folder)."""
    envs = [env(index) if callable(env) else env for index in range(count)]
    started = [
        ServerProcess(database(index), [*DEBUG_LOG, *extra_args], envs[index]) for index in range(count)
    ]
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:  # side by side: each takes a while
            for future in [pool.submit(process.start) for process in started]:
                future.result()
        yield started
    finally:
        for process in started:
            process.kill()


def calls(server: ServerProcess, method: str) -> int:
    """How many calls of ``method`` (e.g. "/spindle.v1.AssistantService/Create") it logged."""
    return sum(
        1 for event in server.log_events() if event.get("event") == "rpc" and event.get("method") == method
    )


def calls_per_replica(
    servers: Sequence[ServerProcess], method: str, total: int, timeout: float = 60.0
) -> list[int]:
    """Each server's count of ``method`` once they add up to at least ``total``: a server logs a
    call before answering it, but its log reaches us through a pipe some time later."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [calls(server, method) for server in servers]
        if sum(counts) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def served(server: ServerProcess, method: str, run_id: str) -> int:
    """How many calls of ``method`` about run ``run_id`` it logged (a stream: once it ended)."""
    return sum(
        1
        for event in server.log_events()
        if event.get("event") == "rpc" and event.get("method") == method and event.get("run_id") == run_id
    )


def served_counts(servers: Sequence[ServerProcess], method: str, run_id: str) -> list[int]:
    return [served(server, method, run_id) for server in servers]


def who_served(
    servers: Sequence[ServerProcess], method: str, run_id: str, before: Sequence[int], timeout: float = 60.0
) -> int:
    """The index of the replica that answered the one call of ``method`` about ``run_id`` made
    since ``before`` (served_counts then), once its log line has come through the pipe."""
    deadline = time.monotonic() + timeout
    while True:
        counts = served_counts(servers, method, run_id)
        if sum(counts) > sum(before):
            (index,) = [i for i, (now, then) in enumerate(zip(counts, before, strict=True)) if now > then]
            return index
        if time.monotonic() > deadline:
            raise AssertionError(f"no replica logged a {method} for {run_id}: {counts}")
        time.sleep(0.02)
