"""One channel, the generated stubs on it, and the call wrapper: deadline, metadata, retry, errors.

``call`` makes a :class:`spindle._requests.Call` (what the resources build, the same for both
twins); ``unary`` is the wrapper itself; ``stream`` opens one server stream.

``SyncTransport`` and ``AsyncTransport`` are twins: the same decisions (``retry_delay``,
``Deadline``, ``from_rpc_error``), one sleeping with ``time.sleep``, the other with ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message

from spindle._channel import Settings, async_channel, sync_channel
from spindle.errors import from_rpc_error
from spindle.retry import Deadline, RetryPolicy, retry_delay
from spindle.v1 import assistant_pb2_grpc, message_pb2_grpc, run_pb2_grpc, thread_pb2_grpc

if TYPE_CHECKING:
    from spindle._requests import Call

R = TypeVar("R", bound=Message)
T = TypeVar("T")
Method = Callable[..., Any]


class _Stubs:
    """The four service stubs over one channel."""

    def __init__(self, channel: Any) -> None:
        self.assistants = assistant_pb2_grpc.AssistantServiceStub(channel)
        self.threads = thread_pb2_grpc.ThreadServiceStub(channel)
        self.messages = message_pb2_grpc.MessageServiceStub(channel)
        self.runs = run_pb2_grpc.RunServiceStub(channel)

    def method(self, service: str, name: str) -> Method:
        """The stub method ``name`` of ``service`` (``"runs"``, ...)."""
        method: Method = getattr(getattr(self, service), name)
        return method


class SyncTransport(_Stubs):
    """Blocking calls over a ``grpc`` channel."""

    def __init__(self, settings: Settings, channel: grpc.Channel | None = None) -> None:
        self.settings = settings
        self.channel = channel if channel is not None else sync_channel(settings)
        super().__init__(self.channel)
        self.listen_batches = True  # False once the server answered ListenBatches UNIMPLEMENTED
        self.create_and_listen = True  # False once it answered CreateAndListen UNIMPLEMENTED

    def call(self, call: Call[R, T], timeout: float | None = None, *, retry: RetryPolicy | None = None) -> T:
        """Make one call of the API (see ``unary``) and read its response."""
        method = self.method(call.service, call.method)
        response = self.unary(
            method, call.request, call.response, timeout=timeout, request_id=call.request_id, retry=retry
        )
        return call.decode(response)

    def unary(
        self,
        method: Method,
        request: Message,
        response_type: type[R],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> R:
        """Call ``method`` until it succeeds, fails for good, or ``timeout`` (one deadline) passes."""
        deadline = Deadline(timeout if timeout is not None else self.settings.timeout)
        metadata = self.settings.metadata(request_id)
        policy = retry or self.settings.retry
        backoff = policy.backoff()
        while True:
            try:
                response: R = method(request, timeout=deadline.remaining(), metadata=metadata)
                return response
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            delay = retry_delay(policy, backoff, deadline, error)
            if delay is None:
                raise error
            time.sleep(delay)

    def stream(
        self,
        method: Method,
        request: Message,
        item_type: type[R],
        *,
        timeout: float | None,
        request_id: str | None = None,
    ) -> Generator[R, None, None]:
        """One server-streaming call (no retry: the caller resumes from where it got to)."""
        call = None
        try:
            call = method(request, timeout=timeout, metadata=self.settings.metadata(request_id))
            for raw in call:
                item: R = raw
                yield item
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            if call is not None:
                call.cancel()  # a no-op once the stream ended; stops it when the reader quit early

    def close(self) -> None:
        self.channel.close()


class AsyncTransport(_Stubs):
    """Awaitable calls over a ``grpc.aio`` channel."""

    def __init__(self, settings: Settings, channel: grpc.aio.Channel | None = None) -> None:
        self.settings = settings
        self.channel = channel if channel is not None else async_channel(settings)
        super().__init__(self.channel)
        self.listen_batches = True  # False once the server answered ListenBatches UNIMPLEMENTED
        self.create_and_listen = True  # False once it answered CreateAndListen UNIMPLEMENTED

    async def call(
        self, call: Call[R, T], timeout: float | None = None, *, retry: RetryPolicy | None = None
    ) -> T:
        """Make one call of the API (see ``unary``) and read its response."""
        method = self.method(call.service, call.method)
        response = await self.unary(
            method, call.request, call.response, timeout=timeout, request_id=call.request_id, retry=retry
        )
        return call.decode(response)

    async def unary(
        self,
        method: Method,
        request: Message,
        response_type: type[R],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> R:
        """Call ``method`` until it succeeds, fails for good, or ``timeout`` (one deadline) passes."""
        deadline = Deadline(timeout if timeout is not None else self.settings.timeout)
        metadata = self.settings.metadata(request_id)
        policy = retry or self.settings.retry
        backoff = policy.backoff()
        while True:
            try:
                response: R = await method(request, timeout=deadline.remaining(), metadata=metadata)
                return response
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            delay = retry_delay(policy, backoff, deadline, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)

    async def stream(
        self,
        method: Method,
        request: Message,
        item_type: type[R],
        *,
        timeout: float | None,
        request_id: str | None = None,
    ) -> AsyncGenerator[R, None]:
        """One server-streaming call (no retry: the caller resumes from where it got to)."""
        call = None
        try:
            call = method(request, timeout=timeout, metadata=self.settings.metadata(request_id))
            async for raw in call:
                item: R = raw
                yield item
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            if call is not None:
                call.cancel()  # a no-op once the stream ended; stops it when the reader quit early

    async def close(self) -> None:
        await self.channel.close()
