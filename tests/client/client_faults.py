"""Client-side fault injection through real grpc interceptors (the server stays real).

They stand for the network between client and server: a response lost after the server acted,
or a proxy that breaks server streams. Each records what it saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc


class LostResponse(grpc.RpcError):
    """What grpc raises when the connection drops (UNAVAILABLE, no details trailer), or another
    bare status a proxy or a crowded server may give."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"{self._code.name.lower()} (injected)"

    def trailing_metadata(self) -> tuple[()]:
        return ()


@dataclass
class Recorder:
    """Counts calls by method and keeps the requests of `method`."""

    method: str
    fail_first: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    requests: list[Any] = field(default_factory=list)

    def see(self, method: str | bytes, request: Any) -> bool:
        """Record a call; True if this one must fail."""
        method = method.decode() if isinstance(method, bytes) else method
        self.calls[method] = self.calls.get(method, 0) + 1
        if not method.endswith(self.method):
            return False
        self.requests.append(request)
        return len(self.requests) <= self.fail_first

    def streams(self) -> dict[str, int]:
        """Streams opened to follow a run: {"ListenBatches": n, "Listen": m}, both always there."""
        prefix = "/spindle.v1.RunService/"
        return {name: self.calls.get(prefix + name, 0) for name in ("ListenBatches", "Listen")}


class DropResponses(grpc.UnaryUnaryClientInterceptor):
    """Sends the first `fail_first` calls of `method` to the server, then loses their responses."""

    def __init__(self, method: str, fail_first: int = 1) -> None:
        self.record = Recorder(method, fail_first)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        fail = self.record.see(details.method, request)
        outcome = continuation(details, request)
        if fail:
            outcome.result()  # the server did the work...
            raise LostResponse()  # ...but the answer never arrives
        return outcome


class DropStreamStarts(grpc.UnaryStreamClientInterceptor):
    """The first `fail_first` streams of `method` reach the server and send their first message,
    which is lost with the connection: the client sees UNAVAILABLE before any message."""

    def __init__(self, method: str, fail_first: int = 1) -> None:
        self.record = Recorder(method, fail_first)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        fail = self.record.see(details.method, request)
        call = continuation(details, request)
        if fail:
            next(call)  # the server acted and began to answer...
            call.cancel()
            raise LostResponse()  # ...but nothing arrives
        return call


class BreakStreams(grpc.UnaryStreamClientInterceptor):
    """Every server-streaming call fails at once with `code` (a proxy that cannot stream, or a
    server out of room for more streams: RESOURCE_EXHAUSTED)."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.record = Recorder("Listen", fail_first=10**9)
        self.code = code

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self.record.see(details.method, request)
        raise LostResponse(self.code)


class CountStreams(grpc.UnaryStreamClientInterceptor):
    """Counts server-streaming calls by method and lets them through (which RPC follows a run)."""

    def __init__(self) -> None:
        self.record = Recorder("-")

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self.record.see(details.method, request)
        return continuation(details, request)


class CountUnary(grpc.UnaryUnaryClientInterceptor):
    """Counts unary calls by method, and keeps the deadline (seconds) each was sent with."""

    def __init__(self) -> None:
        self.record = Recorder("-")
        self.timeouts: dict[str, list[float | None]] = {}

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self.record.see(details.method, request)
        self.timeouts.setdefault(details.method.rsplit("/", 1)[-1], []).append(details.timeout)
        return continuation(details, request)


# ---- grpc.aio twins -----------------------------------------------------------------------------


def _aio_unavailable(code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), f"{code.name.lower()} (injected)"
    )


class AsyncDropResponses(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, method: str, fail_first: int = 1) -> None:
        self.record = Recorder(method, fail_first)

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        fail = self.record.see(details.method, request)
        call = await continuation(details, request)
        if fail:
            await call
            raise _aio_unavailable()
        return call


class AsyncDropStreamStarts(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, method: str, fail_first: int = 1) -> None:
        self.record = Recorder(method, fail_first)

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        fail = self.record.see(details.method, request)
        call = await continuation(details, request)
        if fail:
            await call.read()
            call.cancel()
            raise _aio_unavailable()
        return call


class AsyncBreakStreams(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.record = Recorder("Listen", fail_first=10**9)
        self.code = code

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.record.see(details.method, request)
        raise _aio_unavailable(self.code)


class AsyncCountStreams(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self) -> None:
        self.record = Recorder("-")

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.record.see(details.method, request)
        return await continuation(details, request)


class AsyncCountUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.record = Recorder("-")

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.record.see(details.method, request)
        return await continuation(details, request)
