"""Small helpers for the client's tests."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from support.server import ServerProcess


class HeldPort:
    """A port on 127.0.0.1 kept from other processes for as long as this is open, while a
    server of ours listens there, is stopped, and listens there again.

    A server restarted "on the same port" is otherwise down long enough for another process
    binding port 0 (another test's or a benchmark's server, on a shared machine) to be given
    that port: our restart then fails to bind, and our client talks to that other server (a
    Get of our run answers NOT_FOUND). Here a socket stays bound to the port with SO_REUSEADDR
    and never listens: Linux then gives the port to no one binding port 0 or binding it
    without SO_REUSEADDR, while a listener with SO_REUSEADDR (grpc sets it) may still take it;
    a connection to it while no server listens is refused, as for a free port."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> HeldPort:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Restarter:
    """Restarts a server in the background: stop (SIGTERM), stay down a while, start again."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self._threads: list[threading.Thread] = []
        self._failures: list[BaseException] = []  # a restart's, raised by join()

    @property
    def address(self) -> str:
        return self.server.address

    def restart(self, down_for: float = 0.5) -> threading.Event:
        """Begin a restart; the returned event is set once the server is down."""
        down = threading.Event()

        def bounce() -> None:
            try:
                self.server.stop()
                down.set()
                time.sleep(down_for)  # clients meet a refused connection meanwhile
                self.server.start()
            except BaseException as exc:  # told by join(), not lost in this thread
                self._failures.append(exc)

        thread = threading.Thread(target=bounce, daemon=True)
        self._threads.append(thread)
        thread.start()
        return down

    def join(self, timeout: float = 60.0) -> None:
        """Wait for every restart begun so far to finish; raises the first that failed (a
        client's errors after a failed restart are about a server that is not ours)."""
        for thread in self._threads:
            thread.join(timeout)
        if self._failures:
            raise RuntimeError("a restart of the server failed") from self._failures[0]


class ListenOnlyProxy:
    """A real gRPC server in front of a Spindle server that routes every method but ListenBatches
    and CreateAndListen (an older server, or a proxy that does not know them): those answer
    UNIMPLEMENTED, as grpc does
    for any method it has no handler for. Requests and responses pass as bytes; `calls` counts
    what it saw by method name, routed or not."""

    STREAMS = frozenset({"/spindle.v1.RunService/Listen"})
    # A server older than ListenBatches is older than CreateAndListen too.
    ABSENT = frozenset({"/spindle.v1.RunService/ListenBatches", "/spindle.v1.RunService/CreateAndListen"})

    def __init__(self, target: str) -> None:
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._upstream = grpc.insecure_channel(target)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers((_Routes(self),))
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> ListenOnlyProxy:
        self._server.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.stop(grace=None)
        self._upstream.close()

    def count(self, name: str) -> int:
        """Calls seen of RunService method `name`."""
        with self._lock:
            return self.calls.get(f"/spindle.v1.RunService/{name}", 0)

    def route(self, method: str) -> grpc.RpcMethodHandler | None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
        if method in self.ABSENT:
            return None
        if method in self.STREAMS:
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._stream, method))
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            response: bytes = self._upstream.unary_unary(method)(
                request, metadata=_forwarded(context), timeout=context.time_remaining()
            )
            return response
        except grpc.RpcError as error:
            _relay(error, context)
            raise  # not reached: abort raises

    def _stream(self, method: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._upstream.unary_stream(method)(
            request, metadata=_forwarded(context), timeout=context.time_remaining()
        )
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as error:
            _relay(error, context)


class NoCreateAndListenProxy(ListenOnlyProxy):
    """Routes every method but CreateAndListen: a server older than it, with ListenBatches."""

    STREAMS = frozenset({"/spindle.v1.RunService/Listen", "/spindle.v1.RunService/ListenBatches"})
    ABSENT = frozenset({"/spindle.v1.RunService/CreateAndListen"})


class _Routes(grpc.GenericRpcHandler):
    def __init__(self, proxy: ListenOnlyProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._proxy.route(handler_call_details.method)


def _forwarded(context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
    skip = ("grpc-", ":", "user-agent")
    return [(k, v) for k, v in context.invocation_metadata() if not k.startswith(skip)]


def _relay(error: grpc.RpcError, context: grpc.ServicerContext) -> None:
    """The upstream's status, details and trailers (ErrorInfo), as the proxy's own."""
    call: Any = error
    context.set_trailing_metadata(call.trailing_metadata() or ())
    context.abort(call.code(), call.details() or "")
