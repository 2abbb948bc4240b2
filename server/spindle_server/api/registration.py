"""Registering a generated service with some of its methods replaced (methods that answer stored
bytes as they are, with no response serializer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import grpc


def add_with_replacements(
    add_generated: Callable[[Any, grpc.aio.Server], None],
    servicer: object,
    server: grpc.aio.Server,
    replace: Callable[[dict[str, grpc.RpcMethodHandler]], None],
) -> None:
    """Register `servicer` as the generated `add_*Servicer_to_server` would, after `replace`
    has changed the method handlers it registers (by method name)."""
    captured = _CapturedHandlers()
    add_generated(servicer, cast(grpc.aio.Server, captured))
    replace(captured.handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.name, captured.handlers),))
    server.add_registered_method_handlers(captured.name, captured.handlers)


def unary_bytes(behavior: Callable[..., Any], generated: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`behavior` answering bytes, with the generated method's request deserializer."""
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=generated.request_deserializer)


class _CapturedHandlers:
    """Stands in for a server to take the method handlers the generated code registers."""

    def __init__(self) -> None:
        self.name = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.name = name
        self.handlers = dict(handlers)
