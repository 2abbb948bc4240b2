"""Fixtures: a real server process per test session (and fresh ones where a test needs it).

SPINDLE_TEST_STORE=sqlite|postgresql picks the store the servers run on (`make test` runs both
passes). The PostgreSQL pass runs the integration tests (those that start a server: they use
`server`, `make_server` or `databases`), skips the ones marked sqlite_only, and leaves out the
rest, which do not depend on the store the server runs and ran in the SQLite pass.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from spindle_server.store.sqlite import SqliteStore
from support import postgres
from support.server import Databases, ServerProcess, TestDatabase, store_under_test
from support.stubs import Stubs

STORE = store_under_test()
INTEGRATION_FIXTURES = {"server", "make_server", "databases"}
# CI installs PostgreSQL: there a missing one is an error, not a quiet skip of the whole pass.
REQUIRE_POSTGRES = os.environ.get("SPINDLE_TEST_REQUIRE_POSTGRES", "") in ("1", "true", "yes")


def _postgres_pass_unavailable() -> str | None:
    """Why the PostgreSQL pass cannot run here, or None."""
    if importlib.util.find_spec("spindle_server.store.postgres") is None:
        return "the PostgreSQL store is not in this tree yet"
    if not postgres.available():
        missing = "PostgreSQL is not installed (apt-get install postgresql, or set SPINDLE_TEST_POSTGRES_DSN)"
        if REQUIRE_POSTGRES:
            raise pytest.UsageError(f"SPINDLE_TEST_REQUIRE_POSTGRES is set but {missing}")
        return missing
    return None


def pytest_report_header(config: pytest.Config) -> str:
    return f"spindle store under test: {STORE} (SPINDLE_TEST_STORE=sqlite|postgresql)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if STORE == "sqlite":
        for item in items:
            marker = item.get_closest_marker("postgresql_only")
            if marker is not None:
                why = marker.args[0] if marker.args else "PostgreSQL only"
                reason = f"postgresql_only: {why} (SPINDLE_TEST_STORE=postgresql)"
                item.add_marker(pytest.mark.skip(reason=reason))
        return
    kept: list[pytest.Item] = []
    left_out: list[pytest.Item] = []
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        shared = item.get_closest_marker("postgresql_only") is not None
        (kept if shared or INTEGRATION_FIXTURES.intersection(fixtures) else left_out).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept
    unavailable = _postgres_pass_unavailable()
    for item in items:
        if unavailable is not None:
            item.add_marker(pytest.mark.skip(reason=f"PostgreSQL pass: {unavailable}"))
            continue
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            why = marker.args[0] if marker.args else "SQLite only"
            item.add_marker(pytest.mark.skip(reason=f"sqlite_only: {why}"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The superuser DSN of the session's private PostgreSQL cluster (started on first use)."""
    with postgres.server_dsn() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def pg_admin(pg_server: str) -> Iterator[postgres.Admin]:
    admin = postgres.Admin(pg_server)
    yield admin
    admin.close()


@pytest.fixture(scope="session")
def databases(request: pytest.FixtureRequest) -> Iterator[Databases]:
    """Fresh databases of the store under test, for session- and module-scoped servers."""
    admin = request.getfixturevalue("pg_admin") if STORE == "postgresql" else None
    made = Databases(admin)
    yield made
    made.drop_all()


@pytest.fixture
def new_database(tmp_path: Path, databases: Databases) -> Iterator[Callable[..., TestDatabase]]:
    """`new_database(name)`: a fresh database of the store under test, dropped after the test."""
    made = Databases(databases.admin)
    yield lambda name="spindle": made.new(tmp_path, name)
    made.drop_all()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, databases: Databases) -> Iterator[ServerProcess]:
    """One shared server for tests that only add their own resources."""
    database = databases.new(tmp_path_factory.mktemp("shared"))
    process = ServerProcess(database, ["--tool-timeout", "600"]).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def stubs(server: ServerProcess) -> Iterator[Stubs]:
    connected = Stubs.connect(server.address)
    yield connected
    connected.close()


@pytest.fixture
def make_server(new_database: Callable[..., TestDatabase]) -> Iterator[Callable[..., ServerProcess]]:
    """Start dedicated servers (own flags; one fresh database shared by those started without
    `database=`, as before on one file); all are stopped after the test."""
    started: list[ServerProcess] = []
    default: list[TestDatabase] = []

    def start(
        *args: str, database: TestDatabase | Path | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        if database is None:
            if not default:
                default.append(new_database())
            database = default[0]
        elif isinstance(database, Path) and STORE != "sqlite":
            # It would run on SQLite while the pass claims PostgreSQL.
            pytest.fail("make_server(database=PATH) on the PostgreSQL pass: use new_database()")
        process = ServerProcess(database, args, env).start()
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
