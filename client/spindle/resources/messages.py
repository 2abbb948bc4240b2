"""``client.messages``: add messages to a thread, get and list them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

from spindle import _paging, _requests
from spindle._encode import Order
from spindle._requests import IdLike
from spindle._transport import AsyncTransport, SyncTransport
from spindle.enums import MessageRole
from spindle.types import Message


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
        call = _requests.create_message(thread_id, content, role=role, labels=labels, request_id=request_id)
        return self._t.call(call, timeout)

    def get(self, message_id: IdLike, *, timeout: float | None = None) -> Message:
        """Get a message by id. Raises NotFound."""
        return self._t.call(_requests.get_message(message_id), timeout)

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
        listing = _requests.list_messages(thread_id, run_id, page_size, order)
        return _paging.iterate(lambda token: self._t.call(listing.page(token), timeout), limit)


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
        call = _requests.create_message(thread_id, content, role=role, labels=labels, request_id=request_id)
        return await self._t.call(call, timeout)

    async def get(self, message_id: IdLike, *, timeout: float | None = None) -> Message:
        """Get a message by id. Raises NotFound."""
        return await self._t.call(_requests.get_message(message_id), timeout)

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
        listing = _requests.list_messages(thread_id, run_id, page_size, order)
        return _paging.aiterate(lambda token: self._t.call(listing.page(token), timeout), limit)
