"""``Client``: the synchronous entry point (``AsyncClient`` is its twin in ``spindle.async_client``)."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc

from spindle._channel import DEFAULT_TIMEOUT, Settings
from spindle._transport import SyncTransport
from spindle.resources import Assistants, Messages, Runs, Threads
from spindle.retry import RetryPolicy


class Client:
    """A connection to a Spindle server: one channel, reused by every call.

    Args:
        target: ``host:port`` (default: ``$SPINDLE_TARGET``, else ``localhost:50051``). Several
            replicas: a list of addresses or ``"h1:p1,h2:p2"`` (names in it are looked up once),
            or ``"dns:///name:port"`` for every address of a name; calls are spread over them with
            gRPC's ``round_robin`` and a replica that is down is skipped.
        api_key: sent as ``authorization: Bearer KEY`` (default: ``$SPINDLE_API_KEY``).
        tls: use TLS (default: only when ``root_certificates`` is given).
        root_certificates: PEM roots to trust for TLS (default: the system's).
        client_cert: PEM certificate chain to present to a server that asks for one (mutual
            TLS; implies TLS), with ``client_key``, its PEM private key.
        timeout: default deadline in seconds of each call, retries included.
        retry: how UNAVAILABLE is retried (every call is safe to retry).
        channel_options: extra ``grpc`` channel options.
        interceptors: ``grpc`` client interceptors to wrap the channel with.
        channel: use this channel instead of making one (the client will not close it).

    Use it as a context manager, or call ``close()``::

        with spindle.Client() as client:
            assistant = client.assistants.create(name="helper")
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
        channel: grpc.Channel | None = None,
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
        self._transport = SyncTransport(self.settings, channel)
        self.assistants = Assistants(self._transport)
        self.threads = Threads(self._transport)
        self.messages = Messages(self._transport)
        self.runs = Runs(self._transport)

    @property
    def target(self) -> str:
        """The server's address (several joined with commas), as given."""
        return self.settings.target

    def close(self) -> None:
        """Close the channel (if the client made it)."""
        if self._owns_channel:
            self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(target={self.target!r})"
