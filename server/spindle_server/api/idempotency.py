"""request_id handling (AIP-155): a repeated request_id returns the first response and does
nothing twice, across retries, crashes, restarts and replicas.

There is no reservation. The answer is written by the store in the same transaction as the
change (`record=` on every store write), and that transaction first checks that the request_id
is still unanswered. So a change and its answer commit together or not at all, and of two
concurrent twins the first to commit wins while the other's change is rolled back and it
returns the winner's answer: a retry never waits for an abandoned reservation, and is never
turned away because the first attempt is still in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from spindle_server import faults
from spindle_server.api.errors import ApiError
from spindle_server.store.base import IdempotencyRecord, RequestKey, RequestReplayed, Store

R = TypeVar("R", bound=Message)

# Receives the request_id to hand to its one store write (None: the call has no request_id).
Perform = Callable[[RequestKey | None], Awaitable[R]]


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
    perform: Perform[R],
) -> R:
    """`perform(record)` unless this request_id was answered; it must pass `record` to its write."""
    if not request.request_id:
        return await perform(None)
    fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    key = RequestKey(project, method, request.request_id, fingerprint)
    answered = await store.get_request(project, key.key)
    if answered is not None:
        return _replay(answered, key, response_type)
    if faults.ENABLED:
        await faults.reached(f"idempotency.before_perform:{method}")
    # Carried out to the end even if the caller goes away: the change and its answer commit
    # anyway, and the side effects after the write (waking the engine) must follow them.
    task = asyncio.ensure_future(_perform(store, key, response_type, perform))
    _in_flight.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_in_flight.discard)
    return await asyncio.shield(task)


_in_flight: set[asyncio.Future[Any]] = set()


async def _perform(store: Store, key: RequestKey, response_type: type[R], perform: Perform[R]) -> R:
    try:
        response = await perform(key)
    except RequestReplayed as replayed:  # a twin committed first; our change was rolled back
        return _replay(replayed.record, key, response_type)
    except Exception:
        # Failing may be the twin's doing (THREAD_HAS_ACTIVE_RUN for the run it created, a run
        # no longer waiting for the tools it submitted): then its answer is ours.
        try:
            answered = await store.get_request(key.project, key.key)
        except Exception:
            answered = None
        if answered is None:
            raise
        return _replay(answered, key, response_type)
    if not key.recorded:
        # Nothing was written (a repeat of a submission that went through): keep this answer for
        # the retries, unless a twin recorded one first.
        kept = await store.save_request(key, response.SerializeToString())
        response = _replay(kept, key, response_type)
    if faults.ENABLED:
        await faults.reached(f"idempotency.after_commit:{key.method}")
    return response


def _replay(record: IdempotencyRecord, key: RequestKey, response_type: type[R]) -> R:
    if record.fingerprint != key.fingerprint:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_ID_REUSED",
            f"request_id {key.request_id!r} was already used for a different {key.method} request",
            violations=[("request_id", "was already used for a different request")],
        )
    return response_type.FromString(record.response)


async def drain(within: float) -> None:
    """At shutdown, before the store closes: let requests whose callers left finish."""
    if _in_flight:
        await asyncio.wait(set(_in_flight), timeout=within)
