"""``client.assistants``: create, get, update, delete and list assistants.

Each method builds its call with ``spindle._requests`` (shared by both twins) and makes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Unpack

from spindle import _paging, _requests
from spindle._encode import Order
from spindle._requests import AssistantOptions, IdLike
from spindle._transport import AsyncTransport, SyncTransport
from spindle.types import Assistant


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
        return self._t.call(_requests.create_assistant(options, request_id), timeout)

    def get(self, assistant_id: IdLike, *, timeout: float | None = None) -> Assistant:
        """Get an assistant by id. Raises NotFound."""
        return self._t.call(_requests.get_assistant(assistant_id), timeout)

    def update(
        self,
        assistant_id: IdLike,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[AssistantOptions],
    ) -> Assistant:
        """Change the given options only."""
        return self._t.call(_requests.update_assistant(assistant_id, options, request_id), timeout)

    def delete(
        self, assistant_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> None:
        """Delete an assistant."""
        self._t.call(_requests.delete_assistant(assistant_id, request_id), timeout)

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
        listing = _requests.list_assistants(page_size, order)
        return _paging.iterate(lambda token: self._t.call(listing.page(token), timeout), limit)


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
        return await self._t.call(_requests.create_assistant(options, request_id), timeout)

    async def get(self, assistant_id: IdLike, *, timeout: float | None = None) -> Assistant:
        """Get an assistant by id. Raises NotFound."""
        return await self._t.call(_requests.get_assistant(assistant_id), timeout)

    async def update(
        self,
        assistant_id: IdLike,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[AssistantOptions],
    ) -> Assistant:
        """Change the given options only."""
        return await self._t.call(_requests.update_assistant(assistant_id, options, request_id), timeout)

    async def delete(
        self, assistant_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> None:
        """Delete an assistant."""
        await self._t.call(_requests.delete_assistant(assistant_id, request_id), timeout)

    def list(
        self,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Assistant]:
        """Every assistant, fetched page by page as you ``async for`` over it."""
        listing = _requests.list_assistants(page_size, order)
        return _paging.aiterate(lambda token: self._t.call(listing.page(token), timeout), limit)
