"""Creating a run and streaming it in one call: CreateAndListen (OpenAI's ``create(stream=True)``).

The run is learnt from the stream itself: its first event (index 0) is a STATUS carrying the run
as created. :func:`open_created` makes the call until that first message arrives and hands back
the run and the rest of the stream (the first message included), for the usual follower
(``_follow.listen`` with ``opened``) to read and, if it breaks later, to resume with ListenBatches
from the next index.

Before the first message, the call is retried as Create is (``RetryPolicy``; the same request and
request_id, so a retry streams the same run, never a second one), and an error is Create's own. A
server without the method (UNIMPLEMENTED: an older one, or a proxy that does not route it) is asked
once per client: from then on the transport's ``create_and_listen`` is False and the caller makes
Create then ListenBatches, as before. Sync and async twins side by side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Generator
from contextlib import aclosing, closing

from spindle._requests import Call
from spindle._transport import AsyncTransport, SyncTransport
from spindle.errors import ApiError, Unimplemented
from spindle.retry import Deadline, retry_delay
from spindle.v1 import run_pb2

Batch = run_pb2.StreamEventBatch
Opened = tuple[run_pb2.Run, Generator[Batch, None, None]]
AsyncOpened = tuple[run_pb2.Run, AsyncGenerator[Batch, None]]


def _created(first: Batch | None) -> run_pb2.Run | None:
    """The run event 0 carries (None if the first message is not it: then Create is asked)."""
    if first is None or not first.events or first.events[0].index != 0:
        return None
    event = first.events[0]
    return event.status_change.run if event.HasField("status_change") else None


def _call_timeout(per_call: float, deadline: Deadline) -> float:
    """The call's deadline: the time left, else the client's per-call timeout, as Create had. A
    server that never sends the first message then fails the call rather than holding it for
    ever; past the first event, the follower resumes a stream cut by it with ListenBatches."""
    remaining = deadline.remaining()
    return per_call if remaining is None else remaining


# ---- sync -------------------------------------------------------------------------------------


def open_created(
    transport: SyncTransport, create: Call[run_pb2.Run, run_pb2.Run], deadline: Deadline
) -> Opened | None:
    """The run ``create`` made and its stream from index 0, or None: the server lacks the method
    (or sent no run first), and the caller is to make ``create`` itself, then listen."""
    policy = transport.settings.retry
    backoff = policy.backoff()
    while True:
        stream = transport.stream(
            transport.runs.CreateAndListen,
            create.request,
            Batch,
            timeout=_call_timeout(transport.settings.timeout, deadline),
            request_id=create.request_id,
        )
        try:
            first = next(stream, None)
        except Unimplemented:
            transport.create_and_listen = False  # asked once per client
            return None
        except ApiError as error:
            delay = retry_delay(policy, backoff, deadline, error)
            if delay is None:
                raise
            time.sleep(delay)
            continue
        run = _created(first)
        if run is None or first is None:
            stream.close()
            return None
        return run, _chain(first, stream)


def _chain(first: Batch, stream: Generator[Batch, None, None]) -> Generator[Batch, None, None]:
    with closing(stream):  # closing this closes the call
        yield first
        yield from stream


# ---- async ------------------------------------------------------------------------------------


async def aopen_created(
    transport: AsyncTransport, create: Call[run_pb2.Run, run_pb2.Run], deadline: Deadline
) -> AsyncOpened | None:
    """Async twin of :func:`open_created`."""
    policy = transport.settings.retry
    backoff = policy.backoff()
    while True:
        stream = transport.stream(
            transport.runs.CreateAndListen,
            create.request,
            Batch,
            timeout=_call_timeout(transport.settings.timeout, deadline),
            request_id=create.request_id,
        )
        try:
            first = await anext(stream, None)
        except Unimplemented:
            transport.create_and_listen = False
            return None
        except ApiError as error:
            delay = retry_delay(policy, backoff, deadline, error)
            if delay is None:
                raise
            await asyncio.sleep(delay)
            continue
        run = _created(first)
        if run is None or first is None:
            await stream.aclose()
            return None
        return run, _achain(first, stream)


async def _achain(first: Batch, stream: AsyncGenerator[Batch, None]) -> AsyncGenerator[Batch, None]:
    async with aclosing(stream):
        yield first
        async for batch in stream:
            yield batch
