"""``client.threads``: create, get, update, delete and list conversation threads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

from spindle import _paging, _requests
from spindle._encode import MessageSpec, Order
from spindle._requests import IdLike
from spindle._transport import AsyncTransport, SyncTransport
from spindle.types import Thread


class Threads:
    """Threads: ordered conversations that runs read and reply to."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def create(
        self,
        *,
        name: str | None = None,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        messages: Sequence[MessageSpec] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Thread:
        """Create a thread, optionally with its first messages (strings are user messages)."""
        call = _requests.create_thread(
            name=name, description=description, labels=labels, messages=messages, request_id=request_id
        )
        return self._t.call(call, timeout)

    def get(self, thread_id: IdLike, *, timeout: float | None = None) -> Thread:
        """Get a thread by id. Raises NotFound."""
        return self._t.call(_requests.get_thread(thread_id), timeout)

    def update(
        self,
        thread_id: IdLike,
        *,
        name: str | None = None,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Thread:
        """Change the given fields only (``labels`` replaces all labels)."""
        call = _requests.update_thread(
            thread_id, name=name, description=description, labels=labels, request_id=request_id
        )
        return self._t.call(call, timeout)

    def delete(
        self, thread_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> None:
        """Delete a thread with its messages and runs. FailedPrecondition while a run is active."""
        self._t.call(_requests.delete_thread(thread_id, request_id), timeout)

    def list(
        self,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Thread]:
        """Every thread (newest first unless ``order="asc"``), fetched page by page as you iterate."""
        listing = _requests.list_threads(page_size, order)
        return _paging.iterate(lambda token: self._t.call(listing.page(token), timeout), limit)


class AsyncThreads:
    """Async twin of :class:`Threads`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        *,
        name: str | None = None,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        messages: Sequence[MessageSpec] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Thread:
        """Create a thread, optionally with its first messages (strings are user messages)."""
        call = _requests.create_thread(
            name=name, description=description, labels=labels, messages=messages, request_id=request_id
        )
        return await self._t.call(call, timeout)

    async def get(self, thread_id: IdLike, *, timeout: float | None = None) -> Thread:
        """Get a thread by id. Raises NotFound."""
        return await self._t.call(_requests.get_thread(thread_id), timeout)

    async def update(
        self,
        thread_id: IdLike,
        *,
        name: str | None = None,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Thread:
        """Change the given fields only (``labels`` replaces all labels)."""
        call = _requests.update_thread(
            thread_id, name=name, description=description, labels=labels, request_id=request_id
        )
        return await self._t.call(call, timeout)

    async def delete(
        self, thread_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> None:
        """Delete a thread with its messages and runs. FailedPrecondition while a run is active."""
        await self._t.call(_requests.delete_thread(thread_id, request_id), timeout)

    def list(
        self,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Thread]:
        """Every thread, fetched page by page as you ``async for`` over it."""
        listing = _requests.list_threads(page_size, order)
        return _paging.aiterate(lambda token: self._t.call(listing.page(token), timeout), limit)
