"""request_id handling (AIP-155): a repeated request_id returns the first response and does
nothing twice, across retries, restarts and replicas (the reservation lives in the store)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from spindle_server.api.errors import ApiError
from spindle_server.store.base import Store

R = TypeVar("R", bound=Message)

IN_FLIGHT_WAIT_SECONDS = 10.0


async def once(
    store: Store,
    project: str,
    method: str,
    request: Message,
    request_id: str,
    response_type: type[R],
    perform: Callable[[], Awaitable[R]],
) -> R:
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
    try:
        response = await perform()
    except BaseException:
        await asyncio.shield(store.release_request(project, key))
        raise
    await asyncio.shield(store.complete_request(project, key, response.SerializeToString()))
    return response
