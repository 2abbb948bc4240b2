"""The baseline: a bare grpc.aio server with a unary echo method and a streaming method
(raw bytes, no protobuf): what any Python gRPC service costs on this machine. `GetRun` is the
floor of a protobuf method instead: it decodes a GetRunRequest and answers with a Run kept in
memory (set once with `Remember`, raw bytes), so its only cost beyond the echo is protobuf's.
`Append` (with `--durable-dir`) is the floor of a durable write (bench/_durable_floor.py): the
echo's answer, once the request is committed to a SQLite file in that folder. With `--postgres
DSN`, `PgGet` and `PgAppend` are the same floors with one PostgreSQL round trip a call instead
(bench/_pg_floor.py): a read of the row `Remember` also writes there, and a committed INSERT.

Run as `python -m bench.echo_server [--durable-dir DIR] [--postgres DSN]`; it prints its port like
spindle-server does.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from bench._bare import serve
from bench._durable_floor import DurableLog
from bench._pg_floor import PostgresFloor
from spindle.v1 import run_pb2


async def _echo(request: bytes, _: grpc.aio.ServicerContext) -> bytes:
    return request


_remembered = run_pb2.Run()
_postgres: PostgresFloor | None = None


async def _remember(request: bytes, _: grpc.aio.ServicerContext) -> bytes:
    _remembered.ParseFromString(request)
    if _postgres is not None:
        await _postgres.remember(request)
    return b""


async def _get_run(request: run_pb2.GetRunRequest, _: grpc.aio.ServicerContext) -> run_pb2.Run:
    return _remembered


async def _stream(request: bytes, _: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """`COUNT:SIZE` -> COUNT messages of SIZE bytes."""
    count, size = (int(part) for part in request.decode().split(":"))
    message = b"x" * size
    for _ in range(count):
        yield message


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--durable-dir", type=Path, help="serve Append, writing its SQLite file here")
    parser.add_argument("--postgres", metavar="DSN", help="serve PgGet and PgAppend on this database")
    options = parser.parse_args()
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Remember": grpc.unary_unary_rpc_method_handler(_remember),
        "GetRun": grpc.unary_unary_rpc_method_handler(
            _get_run,
            request_deserializer=run_pb2.GetRunRequest.FromString,
            response_serializer=run_pb2.Run.SerializeToString,
        ),
    }
    if options.durable_dir is not None:
        handlers["Append"] = grpc.unary_unary_rpc_method_handler(
            DurableLog(options.durable_dir / "floor.db").append
        )
    setup = None
    if options.postgres is not None:
        global _postgres
        _postgres = PostgresFloor(options.postgres)
        setup = _postgres.open
        handlers["PgGet"] = grpc.unary_unary_rpc_method_handler(
            _postgres.get, request_deserializer=run_pb2.GetRunRequest.FromString
        )
        handlers["PgAppend"] = grpc.unary_unary_rpc_method_handler(_postgres.append)
    serve("bench.Echo", handlers, setup=setup)


if __name__ == "__main__":
    main()
