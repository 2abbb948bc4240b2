"""``AsyncClient``: the asyncio twin of :class:`spindle.client.Client`, over ``grpc.aio``."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc

from spindle._channel import DEFAULT_TIMEOUT, Settings
from spindle._transport import AsyncTransport
from spindle.resources import AsyncAssistants, AsyncMessages, AsyncRuns, AsyncThreads
from spindle.retry import RetryPolicy


class AsyncClient:
    """A connection to a Spindle server for asyncio code; the same surface as ``Client``, awaited.

    Create it inside a running event loop, and close it with ``await client.close()`` or
    ``async with``::

        async with spindle.AsyncClient() as client:
            run = await client.runs.create(thread_id=thread.id, assistant_id=assistant.id)
            result = await run
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.settings = Settings.resolve(
            target,
            api_key,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            timeout=timeout,
            retry=retry,
            channel_options=channel_options,
            interceptors=interceptors,
        )
        self._owns_channel = channel is None
        self._transport = AsyncTransport(self.settings, channel)
        self.assistants = AsyncAssistants(self._transport)
        self.threads = AsyncThreads(self._transport)
        self.messages = AsyncMessages(self._transport)
        self.runs = AsyncRuns(self._transport)

    @property
    def target(self) -> str:
        """The server's address (several joined with commas), as given."""
        return self.settings.target

    async def close(self) -> None:
        """Close the channel (if the client made it)."""
        if self._owns_channel:
            await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient(target={self.target!r})"
