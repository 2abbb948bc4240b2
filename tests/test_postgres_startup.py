"""A replica started while its PostgreSQL is down: health NOT_SERVING and API calls UNAVAILABLE
while it waits, then it comes up by itself when PostgreSQL does; SIGTERM while waiting ends it.

Each test has a PostgreSQL cluster of its own (the session's shared one cannot be stopped).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import run_pb2
from support import postgres
from support.server import PostgresDatabase, ServerProcess
from support.stubs import Stubs, error_details

pytestmark = [
    pytest.mark.skipif(not postgres.bindir(), reason="PostgreSQL is not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("spindle_server.store.postgres") is None,
        reason="the PostgreSQL store is not in this tree yet",
    ),
]

BOUND = 60.0  # failure bound for waits; never a timing assertion


@pytest.fixture
def down_cluster() -> Iterator[postgres.Cluster]:
    """A cluster with a database, stopped: its port is known and nothing listens on it."""
    cluster = postgres.Cluster()
    try:
        cluster.start()
        cluster.stop(keep=True)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def waiting_server(down_cluster: postgres.Cluster) -> Iterator[ServerProcess]:
    """A server launched on the stopped cluster, seen retrying its database."""
    process = ServerProcess(PostgresDatabase(down_cluster.dsn), ["--log-level", "debug"]).launch()
    try:
        logged = process.wait_for_log(is_waiting, timeout=BOUND)
        process.port = int(str(logged["port"]))
        yield process
    finally:
        process.kill()


def is_waiting(event: dict[str, object]) -> bool:
    return event.get("event") == "database_unavailable"


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=BOUND)
        return int(reply.status)


def test_a_replica_waits_for_postgresql_and_comes_up_with_it(
    waiting_server: ServerProcess, down_cluster: postgres.Cluster
) -> None:
    assert health(waiting_server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    stubs = Stubs.connect(waiting_server.address)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stubs.assistant(name="too early")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        info, _ = error_details(refused.value)
        assert info is not None and info.reason == "STORAGE_UNAVAILABLE"
        assert waiting_server.process is not None and waiting_server.process.poll() is None

        port = down_cluster.port
        down_cluster.start()
        assert down_cluster.port == port  # the DSN the server retries

        waiting_server.await_serving(timeout=BOUND)
        assert health(waiting_server.address) == health_pb2.HealthCheckResponse.SERVING
        done = stubs.wait(stubs.start("hello after the wait").id, timeout=BOUND)
        assert done.status == run_pb2.COMPLETED
    finally:
        stubs.close()


def test_sigterm_while_waiting_for_postgresql_ends_the_server_cleanly(waiting_server: ServerProcess) -> None:
    assert waiting_server.stop(timeout=BOUND) == 0
    assert "Traceback" not in "".join(waiting_server.stderr_lines)


def test_a_database_that_does_not_exist_is_a_clear_error_not_a_wait(down_cluster: postgres.Cluster) -> None:
    down_cluster.start()
    process = ServerProcess(PostgresDatabase(postgres.with_database(down_cluster.dsn, "no_such_database")))
    with pytest.raises(RuntimeError, match="server exited at start") as failed:
        process.start()
    assert "does not exist" in str(failed.value)
    assert "Traceback" not in str(failed.value)
