"""``client.threads``: create, get, update, delete and list conversation threads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

from spindle import _decode, _encode, _paging, _requests
from spindle._encode import MessageSpec, Order
from spindle._requests import IdLike, as_id
from spindle._transport import AsyncTransport, SyncTransport
from spindle.types import Thread
from spindle.v1 import thread_pb2


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
        rid = _encode.request_id(request_id)
        request = _requests.create_thread(
            name=name, description=description, labels=labels, messages=messages, request_id=rid
        )
        return _decode.thread(
            self._t.unary(self._t.threads.Create, request, thread_pb2.Thread, timeout=timeout, request_id=rid)
        )

    def get(self, thread_id: IdLike, *, timeout: float | None = None) -> Thread:
        """Get a thread by id. Raises NotFound."""
        request = thread_pb2.GetThreadRequest(thread_id=as_id(thread_id))
        return _decode.thread(self._t.unary(self._t.threads.Get, request, thread_pb2.Thread, timeout=timeout))

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
        rid = _encode.request_id(request_id)
        request = _requests.update_thread(
            as_id(thread_id), name=name, description=description, labels=labels, request_id=rid
        )
        return _decode.thread(
            self._t.unary(self._t.threads.Update, request, thread_pb2.Thread, timeout=timeout, request_id=rid)
        )

    def delete(
        self, thread_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> None:
        """Delete a thread with its messages and runs. FailedPrecondition while a run is active."""
        rid = _encode.request_id(request_id)
        request = thread_pb2.DeleteThreadRequest(thread_id=as_id(thread_id), request_id=rid)
        stub = self._t.threads
        self._t.unary(stub.Delete, request, thread_pb2.DeleteThreadResponse, timeout=timeout, request_id=rid)

    def list(
        self,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Thread]:
        """Every thread (newest first unless ``order="asc"``), fetched page by page as you iterate."""

        def fetch(token: str) -> _paging.Page[Thread]:
            request = _requests.list_threads(page_size, order)
            request.page_token = token
            page = self._t.unary(
                self._t.threads.List, request, thread_pb2.ListThreadsResponse, timeout=timeout
            )
            return [_decode.thread(t) for t in page.threads], page.next_page_token

        return _paging.iterate(fetch, limit)


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
        rid = _encode.request_id(request_id)
        request = _requests.create_thread(
            name=name, description=description, labels=labels, messages=messages, request_id=rid
        )
        stub = self._t.threads
        return _decode.thread(
            await self._t.unary(stub.Create, request, thread_pb2.Thread, timeout=timeout, request_id=rid)
        )

    async def get(self, thread_id: IdLike, *, timeout: float | None = None) -> Thread:
        """Get a thread by id. Raises NotFound."""
        request = thread_pb2.GetThreadRequest(thread_id=as_id(thread_id))
        return _decode.thread(
            await self._t.unary(self._t.threads.Get, request, thread_pb2.Thread, timeout=timeout)
        )

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
        rid = _encode.request_id(request_id)
        request = _requests.update_thread(
            as_id(thread_id), name=name, description=description, labels=labels, request_id=rid
        )
        stub = self._t.threads
        return _decode.thread(
            await self._t.unary(stub.Update, request, thread_pb2.Thread, timeout=timeout, request_id=rid)
        )

    async def delete(
        self, thread_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> None:
        """Delete a thread with its messages and runs. FailedPrecondition while a run is active."""
        rid = _encode.request_id(request_id)
        request = thread_pb2.DeleteThreadRequest(thread_id=as_id(thread_id), request_id=rid)
        stub = self._t.threads
        await self._t.unary(
            stub.Delete, request, thread_pb2.DeleteThreadResponse, timeout=timeout, request_id=rid
        )

    def list(
        self,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Thread]:
        """Every thread, fetched page by page as you ``async for`` over it."""

        async def fetch(token: str) -> _paging.Page[Thread]:
            request = _requests.list_threads(page_size, order)
            request.page_token = token
            stub = self._t.threads
            page = await self._t.unary(stub.List, request, thread_pb2.ListThreadsResponse, timeout=timeout)
            return [_decode.thread(t) for t in page.threads], page.next_page_token

        return _paging.aiterate(fetch, limit)
