"""What the bare baselines (bench/echo_server.py, bench/stream_server.py) share: serve one generic
service on a free port of 127.0.0.1, print the `serving` line spindle-server prints, run on uvloop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

Setup = Callable[[], Awaitable[None]]


async def _serve(
    service: str, handlers: Mapping[str, grpc.RpcMethodHandler], options: Sequence[Any], setup: Setup | None
) -> None:
    if setup is not None:
        await setup()  # in the loop that serves: what it opens (a pool) belongs to this loop
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, dict(handlers)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    await server.wait_for_termination()


def serve(
    service: str,
    handlers: Mapping[str, grpc.RpcMethodHandler],
    options: Sequence[Any] = (),
    setup: Setup | None = None,
) -> None:
    """Serve `service` until terminated (uvloop when installed, as Spindle's server runs), after
    awaiting `setup` in the serving loop when given."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(service, handlers, options, setup))
        return
    uvloop.run(_serve(service, handlers, options, setup))
