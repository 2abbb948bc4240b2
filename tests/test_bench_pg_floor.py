"""The echo server's PostgreSQL floors (bench/_pg_floor.py, issue 11), which BENCHMARKS.md
compares Spindle's PostgreSQL rows with: against a real cluster, PgGet answers the exact bytes of
the Run `Remember` stored and NOT_FOUND for another id, and PgAppend echoes its request only
once it is a committed row (read back on another connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import grpc
import pytest

from bench._server import ServedProcess, echo_server
from spindle.v1 import run_pb2
from support import postgres

pytestmark = pytest.mark.postgresql_only("the floors need a PostgreSQL database")


@pytest.fixture(scope="module")
def floor_database(pg_admin: postgres.Admin) -> Iterator[str]:
    name = postgres.fresh_name()
    dsn = pg_admin.create_database(name)
    yield dsn
    pg_admin.drop_database(name)


@pytest.fixture(scope="module")
def echo(floor_database: str) -> Iterator[ServedProcess]:
    with echo_server(postgres=floor_database) as served:
        yield served


async def _logged(dsn: str) -> list[bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        return [bytes(row["body"]) for row in await conn.fetch("SELECT body FROM floor_log ORDER BY seq")]
    finally:
        await conn.close()


def test_pg_get_answers_the_remembered_run(echo: ServedProcess) -> None:
    run = run_pb2.Run(
        id="run_floor", thread_id="thread_floor", assistant_id="asst_floor", instructions="x" * 300
    )
    body = run.SerializeToString()
    with grpc.insecure_channel(echo.address) as channel:
        channel.unary_unary("/bench.Echo/Remember")(body)
        got = channel.unary_unary("/bench.Echo/PgGet")(
            run_pb2.GetRunRequest(run_id=run.id).SerializeToString()
        )
        assert got == body
        with pytest.raises(grpc.RpcError) as missing:
            channel.unary_unary("/bench.Echo/PgGet")(
                run_pb2.GetRunRequest(run_id="run_other").SerializeToString()
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_pg_append_echoes_a_committed_row(echo: ServedProcess, floor_database: str) -> None:
    requests = [b"first request", b"second \x00 request"]
    with grpc.insecure_channel(echo.address) as channel:
        for request in requests:
            assert channel.unary_unary("/bench.Echo/PgAppend")(request) == request
    assert asyncio.run(_logged(floor_database)) == requests
