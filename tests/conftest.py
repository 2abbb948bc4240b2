"""Fixtures: a real server process per test session (and fresh ones where a test needs it)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from spindle_server.store.sqlite import SqliteStore
from support.server import ServerProcess
from support.stubs import Stubs


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared server for tests that only add their own resources."""
    database = tmp_path_factory.mktemp("shared") / "spindle.db"
    process = ServerProcess(database, ["--tool-timeout", "600"]).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def stubs(server: ServerProcess) -> Iterator[Stubs]:
    connected = Stubs.connect(server.address)
    yield connected
    connected.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start dedicated servers (own database, own flags); all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, database: Path | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        process = ServerProcess(database or tmp_path / "spindle.db", args, env).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A real SQLite store of its own, opened in the test's event loop."""
    opened = SqliteStore(tmp_path / "store.db")
    await opened.start()
    yield opened
    await opened.close()
