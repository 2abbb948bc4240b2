"""``client.assistants``: create, get, update, delete and list assistants."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Unpack

from spindle import _decode, _encode, _paging, _requests
from spindle._encode import Order
from spindle._requests import AssistantOptions, IdLike, as_id
from spindle._transport import AsyncTransport, SyncTransport
from spindle.types import Assistant
from spindle.v1 import assistant_pb2


class Assistants:
    """Assistants: a model with instructions, tools and default options."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def create(
        self,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[AssistantOptions],
    ) -> Assistant:
        """Create an assistant. ``tools`` takes FunctionTools, Python functions or OpenAI-style dicts."""
        rid = _encode.request_id(request_id)
        request = _requests.create_assistant(options, rid)
        stub = self._t.assistants
        return _decode.assistant(
            self._t.unary(stub.Create, request, assistant_pb2.Assistant, timeout=timeout, request_id=rid)
        )

    def get(self, assistant_id: IdLike, *, timeout: float | None = None) -> Assistant:
        """Get an assistant by id. Raises NotFound."""
        request = assistant_pb2.GetAssistantRequest(assistant_id=as_id(assistant_id))
        return _decode.assistant(
            self._t.unary(self._t.assistants.Get, request, assistant_pb2.Assistant, timeout=timeout)
        )

    def update(
        self,
        assistant_id: IdLike,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[AssistantOptions],
    ) -> Assistant:
        """Change the given options only."""
        rid = _encode.request_id(request_id)
        request = _requests.update_assistant(as_id(assistant_id), options, rid)
        stub = self._t.assistants
        return _decode.assistant(
            self._t.unary(stub.Update, request, assistant_pb2.Assistant, timeout=timeout, request_id=rid)
        )

    def delete(
        self, assistant_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> None:
        """Delete an assistant."""
        rid = _encode.request_id(request_id)
        request = assistant_pb2.DeleteAssistantRequest(assistant_id=as_id(assistant_id), request_id=rid)
        stub = self._t.assistants
        self._t.unary(
            stub.Delete, request, assistant_pb2.DeleteAssistantResponse, timeout=timeout, request_id=rid
        )

    def list(
        self,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Assistant]:
        """Every assistant (newest first unless ``order="asc"``), fetched page by page as you iterate.

        ``timeout`` applies to each page's call; ``limit`` stops after that many items.
        """

        def fetch(token: str) -> _paging.Page[Assistant]:
            request = _requests.list_assistants(page_size, order)
            request.page_token = token
            stub = self._t.assistants
            page = self._t.unary(stub.List, request, assistant_pb2.ListAssistantsResponse, timeout=timeout)
            return [_decode.assistant(a) for a in page.assistants], page.next_page_token

        return _paging.iterate(fetch, limit)


class AsyncAssistants:
    """Async twin of :class:`Assistants`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[AssistantOptions],
    ) -> Assistant:
        """Create an assistant. ``tools`` takes FunctionTools, Python functions or OpenAI-style dicts."""
        rid = _encode.request_id(request_id)
        request = _requests.create_assistant(options, rid)
        stub = self._t.assistants
        return _decode.assistant(
            await self._t.unary(
                stub.Create, request, assistant_pb2.Assistant, timeout=timeout, request_id=rid
            )
        )

    async def get(self, assistant_id: IdLike, *, timeout: float | None = None) -> Assistant:
        """Get an assistant by id. Raises NotFound."""
        request = assistant_pb2.GetAssistantRequest(assistant_id=as_id(assistant_id))
        return _decode.assistant(
            await self._t.unary(self._t.assistants.Get, request, assistant_pb2.Assistant, timeout=timeout)
        )

    async def update(
        self,
        assistant_id: IdLike,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[AssistantOptions],
    ) -> Assistant:
        """Change the given options only."""
        rid = _encode.request_id(request_id)
        request = _requests.update_assistant(as_id(assistant_id), options, rid)
        stub = self._t.assistants
        return _decode.assistant(
            await self._t.unary(
                stub.Update, request, assistant_pb2.Assistant, timeout=timeout, request_id=rid
            )
        )

    async def delete(
        self, assistant_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> None:
        """Delete an assistant."""
        rid = _encode.request_id(request_id)
        request = assistant_pb2.DeleteAssistantRequest(assistant_id=as_id(assistant_id), request_id=rid)
        stub = self._t.assistants
        await self._t.unary(
            stub.Delete, request, assistant_pb2.DeleteAssistantResponse, timeout=timeout, request_id=rid
        )

    def list(
        self,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Assistant]:
        """Every assistant, fetched page by page as you ``async for`` over it."""

        async def fetch(token: str) -> _paging.Page[Assistant]:
            request = _requests.list_assistants(page_size, order)
            request.page_token = token
            stub = self._t.assistants
            page = await self._t.unary(
                stub.List, request, assistant_pb2.ListAssistantsResponse, timeout=timeout
            )
            return [_decode.assistant(a) for a in page.assistants], page.next_page_token

        return _paging.aiterate(fetch, limit)
