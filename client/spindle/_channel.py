"""Connection settings and the gRPC channels built from them (sync ``grpc`` and ``grpc.aio``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from spindle._encode import request_id as new_request_id
from spindle._targets import ROUND_ROBIN, ChannelTarget, channel_target, join
from spindle.retry import DEFAULT_RETRY, RetryPolicy

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 60.0
TARGET_ENV = "SPINDLE_TARGET"
API_KEY_ENV = "SPINDLE_API_KEY"
USER_AGENT = "spindle-python/0.1.0"

# Reconnect quickly after a server restart instead of grpc's default 1 s doubling to 120 s.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.primary_user_agent", USER_AGENT),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
# Options by which a caller picks the load-balancing policy themselves.
_POLICY_OPTIONS = frozenset({"grpc.service_config", "grpc.lb_policy_name"})


@dataclass(frozen=True)
class Settings:
    """Everything a client needs to reach the server; shared by ``Client`` and ``AsyncClient``."""

    target: str  # as the user gave it; several addresses joined with commas
    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    timeout: float = DEFAULT_TIMEOUT
    retry: RetryPolicy = DEFAULT_RETRY
    channel_options: tuple[tuple[str, Any], ...] = ()
    interceptors: tuple[Any, ...] = field(default_factory=tuple)

    @classmethod
    def resolve(
        cls,
        target: str | Sequence[str] | None,
        api_key: str | None,
        *,
        tls: bool | None,
        root_certificates: bytes | None,
        timeout: float,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        retry: RetryPolicy | None,
        channel_options: Sequence[tuple[str, Any]],
        interceptors: Sequence[Any],
    ) -> Settings:
        """Fill what the caller left out from ``SPINDLE_TARGET`` / ``SPINDLE_API_KEY`` and defaults."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together")
        if client_cert is not None and tls is False:
            raise ValueError("a client certificate needs TLS")
        return cls(
            target=join(target) if target else os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
            api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
            tls=bool(root_certificates or client_cert) if tls is None else tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            timeout=timeout,
            retry=retry or DEFAULT_RETRY,
            channel_options=tuple(channel_options),
            interceptors=tuple(interceptors),
        )

    def channel(self) -> tuple[str, list[tuple[str, Any]]]:
        """The grpc target and channel options: ``round_robin`` over several addresses or a
        resolver's (unless the caller's options choose a policy); the caller's options win."""
        target = channel_target(self.target)
        return target.uri, self.options(target)

    def options(self, target: ChannelTarget | None = None) -> list[tuple[str, Any]]:
        given = {name for name, _ in self.channel_options}
        ours = list(_CHANNEL_OPTIONS)
        if target is not None and target.balanced and not given & _POLICY_OPTIONS:
            ours.append(("grpc.service_config", ROUND_ROBIN))
        if target is not None and target.authority:
            ours.append(("grpc.default_authority", target.authority))
        return [*self.channel_options, *(o for o in ours if o[0] not in given)]

    def metadata(self, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the API key as a bearer token and the request id (a new one if not
        given) for the server's log."""
        pairs = [("x-request-id", new_request_id(request_id))]
        if self.api_key:
            pairs.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(pairs)


def _credentials(settings: Settings) -> grpc.ChannelCredentials:
    """TLS, with the client's certificate when the server asks for one (mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=settings.root_certificates,
        private_key=settings.client_key,
        certificate_chain=settings.client_cert,
    )


def sync_channel(settings: Settings) -> grpc.Channel:
    """A ``grpc`` channel (TLS if asked), with the settings' interceptors."""
    target, options = settings.channel()
    if settings.tls:
        channel = grpc.secure_channel(target, _credentials(settings), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if settings.interceptors:
        return grpc.intercept_channel(channel, *settings.interceptors)
    return channel


def async_channel(settings: Settings) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel (TLS if asked), with the settings' interceptors."""
    interceptors = list(settings.interceptors) or None
    target, options = settings.channel()
    if settings.tls:
        return grpc.aio.secure_channel(
            target, _credentials(settings), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
