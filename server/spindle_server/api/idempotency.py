"""request_id handling (AIP-155): a repeated request_id returns the first response and does
nothing twice, across retries, restarts and replicas (the reservation lives in the store)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from spindle_server.api.errors import ApiError
from spindle_server.store.base import Store

R = TypeVar("R", bound=Message)

IN_FLIGHT_WAIT_SECONDS = 10.0


class IdempotentRequest(Protocol):
    """A request message with a request_id field."""

    @property
    def request_id(self) -> str: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


async def once(
    store: Store,
    project: str,
    method: str,
    request: IdempotentRequest,
    response_type: type[R],
    perform: Callable[[], Awaitable[R]],
) -> R:
    request_id = request.request_id
    if not request_id:
        return await perform()
    key = f"{method}:{request_id}"
    fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    loop = asyncio.get_running_loop()
    give_up = loop.time() + IN_FLIGHT_WAIT_SECONDS
    delay = 0.01
    while True:
        record = await store.reserve_request(project, key, fingerprint)
        if record is None:
            break
        if record.fingerprint != fingerprint:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "REQUEST_ID_REUSED",
                f"request_id {request_id!r} was already used for a different {method} request",
                violations=[("request_id", "was already used for a different request")],
            )
        if record.response is not None:
            return response_type.FromString(record.response)
        if loop.time() >= give_up:
            raise ApiError(
                grpc.StatusCode.ABORTED,
                "REQUEST_IN_PROGRESS",
                f"a request with request_id {request_id!r} is still being served; retry later",
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    # Once reserved, the request is carried out and its answer recorded even if the caller goes
    # away meanwhile: a store write that is already queued commits anyway, and releasing the
    # reservation then would let the client's retry do the same thing a second time.
    task = asyncio.ensure_future(_perform_and_record(store, project, key, perform))
    _in_flight.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_in_flight.discard)
    return await asyncio.shield(task)


_in_flight: set[asyncio.Future[Any]] = set()


async def _perform_and_record(store: Store, project: str, key: str, perform: Callable[[], Awaitable[R]]) -> R:
    try:
        response = await perform()
    except BaseException:
        await store.release_request(project, key)
        raise
    await store.complete_request(project, key, response.SerializeToString())
    return response


async def drain(within: float) -> None:
    """At shutdown, before the store closes: let requests whose callers left finish recording."""
    if _in_flight:
        await asyncio.wait(set(_in_flight), timeout=within)
