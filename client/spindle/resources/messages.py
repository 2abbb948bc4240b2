"""``client.messages``: add messages to a thread, get and list them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

from spindle import _decode, _encode, _paging, _requests
from spindle._encode import Order
from spindle._requests import IdLike, as_id
from spindle._transport import AsyncTransport, SyncTransport
from spindle.enums import MessageRole
from spindle.types import Message
from spindle.v1 import message_pb2


class Messages:
    """Messages of threads."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def create(
        self,
        thread_id: IdLike,
        content: str | Sequence[str],
        *,
        role: MessageRole | str = MessageRole.USER,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Add a message (text, or a list of text parts). FailedPrecondition while a run is active."""
        rid = _encode.request_id(request_id)
        request = _requests.create_message(
            as_id(thread_id), content, role=role, labels=labels, request_id=rid
        )
        stub = self._t.messages
        return _decode.message(
            self._t.unary(stub.Create, request, message_pb2.Message, timeout=timeout, request_id=rid)
        )

    def get(self, message_id: IdLike, *, timeout: float | None = None) -> Message:
        """Get a message by id. Raises NotFound."""
        request = message_pb2.GetMessageRequest(message_id=as_id(message_id))
        return _decode.message(
            self._t.unary(self._t.messages.Get, request, message_pb2.Message, timeout=timeout)
        )

    def list(
        self,
        thread_id: IdLike,
        *,
        run_id: IdLike | None = None,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Message]:
        """A thread's messages (newest first unless ``order="asc"``); ``run_id``: only that run's."""

        def fetch(token: str) -> _paging.Page[Message]:
            run = as_id(run_id) if run_id is not None else None
            request = _requests.list_messages(as_id(thread_id), run, page_size, order)
            request.page_token = token
            stub = self._t.messages
            page = self._t.unary(stub.List, request, message_pb2.ListMessagesResponse, timeout=timeout)
            return [_decode.message(m) for m in page.messages], page.next_page_token

        return _paging.iterate(fetch, limit)


class AsyncMessages:
    """Async twin of :class:`Messages`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        thread_id: IdLike,
        content: str | Sequence[str],
        *,
        role: MessageRole | str = MessageRole.USER,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Add a message (text, or a list of text parts). FailedPrecondition while a run is active."""
        rid = _encode.request_id(request_id)
        request = _requests.create_message(
            as_id(thread_id), content, role=role, labels=labels, request_id=rid
        )
        stub = self._t.messages
        return _decode.message(
            await self._t.unary(stub.Create, request, message_pb2.Message, timeout=timeout, request_id=rid)
        )

    async def get(self, message_id: IdLike, *, timeout: float | None = None) -> Message:
        """Get a message by id. Raises NotFound."""
        request = message_pb2.GetMessageRequest(message_id=as_id(message_id))
        return _decode.message(
            await self._t.unary(self._t.messages.Get, request, message_pb2.Message, timeout=timeout)
        )

    def list(
        self,
        thread_id: IdLike,
        *,
        run_id: IdLike | None = None,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Message]:
        """A thread's messages, fetched page by page as you ``async for`` over them."""

        async def fetch(token: str) -> _paging.Page[Message]:
            run = as_id(run_id) if run_id is not None else None
            request = _requests.list_messages(as_id(thread_id), run, page_size, order)
            request.page_token = token
            stub = self._t.messages
            page = await self._t.unary(stub.List, request, message_pb2.ListMessagesResponse, timeout=timeout)
            return [_decode.message(m) for m in page.messages], page.next_page_token

        return _paging.aiterate(fetch, limit)
