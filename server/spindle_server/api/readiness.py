"""Refuses API calls with UNAVAILABLE until the server is ready (its database reachable).

The port opens before the database is reached, so health checks can say NOT_SERVING while a
replica waits for PostgreSQL; a call that arrives meanwhile gets STORAGE_UNAVAILABLE (retryable)
rather than reaching a store that is not open. Health and reflection always pass. It sits inside
CallInterceptor, which maps the error and logs the call like any other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from spindle_server.store.errors import UnavailableError

ALWAYS_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ReadinessGate(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.ready = False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if self.ready or handler is None or details.method.startswith(ALWAYS_OPEN):
            return handler
        if handler.unary_unary is not None:

            async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
                raise _not_ready()

            return grpc.unary_unary_rpc_method_handler(
                refuse,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:

            async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                raise _not_ready()
                yield  # an async generator, as the stream handlers are

            return grpc.unary_stream_rpc_method_handler(
                refuse_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _not_ready() -> UnavailableError:
    return UnavailableError("the server is starting: its database is not reachable yet; retry")
