"""The baseline: a bare grpc.aio server with a unary echo method and a streaming method
(raw bytes, no protobuf): what any Python gRPC service costs on this machine.

Run as `python -m bench.echo_server`; it prints its port like spindle-server does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc


async def _echo(request: bytes, _: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(request: bytes, _: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """`COUNT:SIZE` -> COUNT messages of SIZE bytes."""
    count, size = (int(part) for part in request.decode().split(":"))
    message = b"x" * size
    for _ in range(count):
        yield message


async def main() -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
