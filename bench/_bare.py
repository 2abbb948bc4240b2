"""What the bare baselines (bench/echo_server.py, bench/stream_server.py) share: serve one generic
service on a free port of 127.0.0.1, print the `serving` line spindle-server prints, run on uvloop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc


async def _serve(service: str, handlers: Mapping[str, grpc.RpcMethodHandler], options: Sequence[Any]) -> None:
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, dict(handlers)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    await server.wait_for_termination()


def serve(service: str, handlers: Mapping[str, grpc.RpcMethodHandler], options: Sequence[Any] = ()) -> None:
    """Serve `service` until terminated (uvloop when installed, as Spindle's server runs)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(service, handlers, options))
        return
    uvloop.run(_serve(service, handlers, options))
