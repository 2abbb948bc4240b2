"""The floors of a PostgreSQL read and of a PostgreSQL durable write, for the bare echo server:
unary methods that make one round trip a call through an asyncpg pool, and nothing else.

The pool is the one Spindle's PostgreSQL store opens by default (store/postgres.py): 2 to 10
connections, no reset query on release. `PgGet` is a Get's read: it parses the GetRunRequest
and answers the bytes of one row, `SELECT body FROM floor_runs WHERE id = $1` (the Run is put
there by `remember`, the Run Spindle's Get answered). `PgAppend` is a durable Create's write:
one `INSERT` in its own transaction (autocommit), answered once PostgreSQL has committed it
with the WAL flushed (the cluster's synchronous_commit), then the request echoed. What one
PostgreSQL round trip a call costs any grpc.aio service on this machine, before it validates,
builds or locks anything.
"""

from __future__ import annotations

import asyncpg
import grpc

from spindle.v1 import run_pb2
from spindle_server.config import ServerConfig
from spindle_server.store.postgres import keep_session

POOL_MIN = ServerConfig().pg_pool_min  # Spindle's defaults
POOL_MAX = ServerConfig().pg_pool_max
SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_runs (id TEXT PRIMARY KEY, body BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS floor_log (seq BIGSERIAL PRIMARY KEY, body BYTEA NOT NULL);
"""


class PostgresFloor:
    """Opened in the server's loop before it serves (`open`); its methods are the handlers."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=POOL_MIN, max_size=POOL_MAX, command_timeout=60.0, reset=keep_session
        )
        async with self._pool.acquire() as conn:
            await conn.execute(SCHEMA)

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "PostgresFloor.open() first"
        return self._pool

    async def remember(self, run: bytes) -> None:
        """Keeps a serialized Run as the row PgGet reads by its id."""
        run_id = run_pb2.Run.FromString(run).id
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO floor_runs(id, body) VALUES ($1, $2)"
                " ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                run_id,
                run,
            )

    async def get(self, request: run_pb2.GetRunRequest, context: grpc.aio.ServicerContext) -> bytes:
        async with self.pool.acquire() as conn:
            body = await conn.fetchval("SELECT body FROM floor_runs WHERE id = $1", request.run_id)
        if body is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id} remembered")
        return bytes(body)

    async def append(self, request: bytes, _: grpc.aio.ServicerContext) -> bytes:
        """Answers the request's bytes (the echo's answer) once they are committed."""
        async with self.pool.acquire() as conn:
            await conn.execute("INSERT INTO floor_log(body) VALUES ($1)", request)
        return request
