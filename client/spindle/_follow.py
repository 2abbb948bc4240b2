"""Following a run: ``listen`` (a resumable event stream) and ``wait`` (the stream, else polling Get).

The stream is ListenBatches: the same events as Listen, several to a message when the listener
is behind (a backlog, a replay), yielded here one by one. A server that answers UNIMPLEMENTED (an
older one, or a proxy that does not route the method) is asked once per client: from then on the
transport's ``listen_batches`` is False and every stream is Listen.

Sync and async twins side by side; the decisions are shared: :class:`EventCursor` keeps the place
(so a reconnect resumes at last index + 1, no gap, no duplicate), :func:`is_ready` says when a
wait is over (terminal, or paused in TOOL_CALLS), :class:`Follow` says which failures are worth
another try and when the deadline has passed, :func:`poll_policy` is the fallback's backoff.

``wait`` reads the run with Get (it may be ready already), then rides the stream from the
handle's place. A terminal event that carries the finished run (DONE's ``done.run``, a terminal
STATUS's ``status_change.run``: :func:`finished_run`) ends the wait with that run, no Get after
it. Otherwise the stream is only a trigger: on a terminal event without the run (ERROR, or a
server older than ``done.run``) or a TOOL_CALLS event it reads the run with Get and returns when
Get says the run is ready. An old TOOL_CALLS event replayed from the log (already answered)
therefore never ends a wait. Get is also the judge of failures: when the stream
fails for good (a proxy that cannot stream, a server out of room for more streams), the wait goes
on by polling Get alone, and an error that Get gives too (NOT_FOUND, UNAUTHENTICATED) is raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from contextlib import aclosing, closing
from dataclasses import dataclass
from typing import Any

from spindle._events import EventCursor
from spindle._requests import get_run
from spindle._transport import AsyncTransport, SyncTransport
from spindle.enums import EventType, RunStatus
from spindle.errors import ApiError, Cancelled, DeadlineExceeded, Unimplemented
from spindle.results import RunEvent
from spindle.retry import NO_RETRY, Backoff, Deadline, RetryPolicy
from spindle.v1 import run_pb2

DEFAULT_POLL_INTERVAL = 0.2
MIN_POLL_INTERVAL = 0.01
MAX_POLL_INTERVAL = 2.0


def is_ready(run: run_pb2.Run) -> bool:
    """A wait is over: the run is terminal or paused for tool results."""
    status = RunStatus(run.status)
    return status.is_finished or status.is_paused


def finished_run(event: run_pb2.StreamEvent) -> run_pb2.Run | None:
    """The finished run a terminal event carries (DONE's ``done.run``, a terminal STATUS's
    ``status_change.run``), else None: ERROR, any other event, a server that does not send it."""
    if event.type == run_pb2.StreamEvent.DONE and event.done.HasField("run"):
        run = event.done.run
    elif event.type == run_pb2.StreamEvent.STATUS and event.status_change.HasField("run"):
        run = event.status_change.run
    else:
        return None
    return run if RunStatus(run.status).is_finished else None


def poll_policy(poll_interval: float | None) -> RetryPolicy:
    """Jittered backoff between fallback polls: from ``poll_interval`` growing 1.5x up to 2 s
    (at least 10 ms: an interval of 0 would poll in a tight loop and never grow)."""
    initial = DEFAULT_POLL_INTERVAL if poll_interval is None else max(poll_interval, MIN_POLL_INTERVAL)
    return RetryPolicy(initial=initial, maximum=max(initial, MAX_POLL_INTERVAL), multiplier=1.5)


@dataclass(frozen=True, slots=True)
class Follow:
    """What one listen or wait needs besides the transport, and the decisions both make."""

    run_id: str
    cursor: EventCursor
    deadline: Deadline
    retry: RetryPolicy
    on_event: Callable[[RunEvent], None]
    on_run: Callable[[run_pb2.Run], None]
    on_timeout: Callable[[], Exception]

    def triggers_check(self, event: RunEvent) -> bool:
        return event.is_terminal or event.type is EventType.TOOL_CALLS

    def is_transient(self, error: ApiError) -> bool:
        """Worth another try while time is left.

        What the retry policy retries (UNAVAILABLE: connection refused or dropped); CANCELLED,
        which a server that shuts down gives the calls it still has (this client never cancels a
        call it still waits for); DEADLINE_EXCEEDED of one call (a poll's ``poll_timeout``, a
        proxy's limit): the wall-clock deadline of the whole follow is checked on its own.
        """
        return self.retry.is_retryable(error) or isinstance(error, Cancelled | DeadlineExceeded)

    def resume_or_raise(self, error: ApiError) -> None:
        """Return if ``error`` is transient and time is left (reconnect, or poll again); raise
        ``error`` itself if it is not transient (NOT_FOUND, ...), else the timeout error."""
        if not self.is_transient(error):
            raise error
        if self.deadline.expired():
            raise self.on_timeout() from error

    def stream_failed(self, error: ApiError) -> bool:
        """The stream of a wait failed: True to open it again later, False to poll Get alone from
        now on (it failed for good; Get tells whether the run itself is the problem). Raises the
        timeout error once the deadline has passed."""
        if self.deadline.expired():
            raise self.on_timeout() from error
        return self.is_transient(error)

    def pause(self, backoff: Backoff) -> float:
        """The next backoff delay, cut to the time left."""
        return self.deadline.cap(backoff.next_delay()) or 0.0

    def poll_deadline(self, poll_timeout: float | None, default: float) -> float | None:
        """The deadline of one Get: ``poll_timeout`` (else the client's), cut to the time left."""
        return self.deadline.cap(poll_timeout or default)

    def listen_request(self) -> run_pb2.ListenRunRequest:
        return run_pb2.ListenRunRequest(run_id=self.run_id, events_start_idx=self.cursor.next_index)


Batches = Generator[run_pb2.StreamEventBatch, None, None]
AsyncBatches = AsyncGenerator[run_pb2.StreamEventBatch, None]

Received = tuple[RunEvent, run_pb2.StreamEvent]
"""A new event of a stream, decoded, with its proto (whose ``done.run`` the decoded one lacks)."""


def _events(raw: Any, batched: bool) -> Sequence[run_pb2.StreamEvent]:
    """The events of one message: a StreamEventBatch's (ListenBatches) or the StreamEvent itself."""
    events: Sequence[run_pb2.StreamEvent] = raw.events if batched else (raw,)
    return events


# ---- sync -------------------------------------------------------------------------------------


def _stream_once(
    transport: SyncTransport, follow: Follow, opened: Batches | None = None
) -> Generator[Received, None, None]:
    """One stream from the cursor (ListenBatches, else Listen: see :func:`_open`; or `opened`,
    batches already under way from the cursor, CreateAndListen's); yields new events one by one
    (observed, with their protos), raises ApiError on failure."""
    while True:
        batched = True if opened is not None else transport.listen_batches
        stream = opened if opened is not None else _open(transport, follow, batched)
        opened = None
        try:
            with closing(stream):
                for raw in stream:
                    for item in _events(raw, batched):
                        event = follow.cursor.accept(item)
                        if event is not None:
                            follow.on_event(event)
                            yield event, item
            return
        except Unimplemented:
            if not batched:
                raise
            transport.listen_batches = False  # asked once per client; Listen from the cursor


def _open(transport: SyncTransport, follow: Follow, batched: bool) -> Generator[Any, None, None]:
    request, timeout = follow.listen_request(), follow.deadline.remaining()
    if batched:
        return transport.stream(
            transport.runs.ListenBatches, request, run_pb2.StreamEventBatch, timeout=timeout
        )
    return transport.stream(transport.runs.Listen, request, run_pb2.StreamEvent, timeout=timeout)


def listen(
    transport: SyncTransport, follow: Follow, opened: Batches | None = None
) -> Generator[RunEvent, None, None]:
    """Events until the terminal one; reconnects after transient failures until the deadline.
    `opened`: the first stream, already under way (CreateAndListen's); reconnects are ListenBatches."""
    backoff = follow.retry.backoff()
    while not follow.cursor.finished:
        received = False
        try:
            with closing(_stream_once(transport, follow, opened)) as events:
                opened = None
                for event, _ in events:
                    received = True
                    backoff.reset()
                    yield event
        except ApiError as error:
            follow.resume_or_raise(error)
            time.sleep(follow.pause(backoff))
            continue
        if not received:
            return  # the server had nothing after our index: we started past the end


def wait(
    transport: SyncTransport, follow: Follow, *, poll_interval: float | None, poll_timeout: float | None
) -> run_pb2.Run:
    """The run once it is terminal or paused: rides Listen, falls back to polling Get."""
    backoff = poll_policy(poll_interval).backoff()
    ride = True  # False once the stream failed for good: poll alone
    while True:
        run = _poll_once(transport, follow, poll_timeout)
        if run is not None and is_ready(run):
            return run
        if ride:
            try:
                with closing(_stream_once(transport, follow)) as events:
                    for event, item in events:
                        backoff.reset()
                        if (run := finished_run(item)) is not None:
                            follow.on_run(run)  # as a Get would: the handle takes it
                            return run
                        if follow.triggers_check(event):
                            run = _poll_once(transport, follow, poll_timeout)
                            if run is not None and is_ready(run):
                                return run
            except ApiError as error:
                ride = follow.stream_failed(error)
        time.sleep(follow.pause(backoff))


def _poll_once(transport: SyncTransport, follow: Follow, poll_timeout: float | None) -> run_pb2.Run | None:
    """The run from one Get, or None after a transient failure; raises a permanent one, or the
    timeout error once the deadline has passed."""
    if follow.deadline.expired():
        raise follow.on_timeout() from None
    timeout = follow.poll_deadline(poll_timeout, transport.settings.timeout)
    try:
        run = transport.call(get_run(follow.run_id), timeout, retry=NO_RETRY)
    except ApiError as error:
        follow.resume_or_raise(error)
        return None
    follow.on_run(run)
    return run


# ---- async ------------------------------------------------------------------------------------


async def _astream_once(
    transport: AsyncTransport, follow: Follow, opened: AsyncBatches | None = None
) -> AsyncGenerator[Received, None]:
    """Async twin of :func:`_stream_once`."""
    while True:
        batched = True if opened is not None else transport.listen_batches
        stream = opened if opened is not None else _aopen(transport, follow, batched)
        opened = None
        try:
            async with aclosing(stream):
                async for raw in stream:
                    for item in _events(raw, batched):
                        event = follow.cursor.accept(item)
                        if event is not None:
                            follow.on_event(event)
                            yield event, item
            return
        except Unimplemented:
            if not batched:
                raise
            transport.listen_batches = False


def _aopen(transport: AsyncTransport, follow: Follow, batched: bool) -> AsyncGenerator[Any, None]:
    request, timeout = follow.listen_request(), follow.deadline.remaining()
    if batched:
        return transport.stream(
            transport.runs.ListenBatches, request, run_pb2.StreamEventBatch, timeout=timeout
        )
    return transport.stream(transport.runs.Listen, request, run_pb2.StreamEvent, timeout=timeout)


async def alisten(
    transport: AsyncTransport, follow: Follow, opened: AsyncBatches | None = None
) -> AsyncGenerator[RunEvent, None]:
    """Async twin of :func:`listen`."""
    backoff = follow.retry.backoff()
    while not follow.cursor.finished:
        received = False
        try:
            async with aclosing(_astream_once(transport, follow, opened)) as events:
                opened = None
                async for event, _ in events:
                    received = True
                    backoff.reset()
                    yield event
        except ApiError as error:
            follow.resume_or_raise(error)
            await asyncio.sleep(follow.pause(backoff))
            continue
        if not received:
            return


async def await_run(
    transport: AsyncTransport, follow: Follow, *, poll_interval: float | None, poll_timeout: float | None
) -> run_pb2.Run:
    """Async twin of :func:`wait`."""
    backoff = poll_policy(poll_interval).backoff()
    ride = True
    while True:
        run = await _apoll_once(transport, follow, poll_timeout)
        if run is not None and is_ready(run):
            return run
        if ride:
            try:
                async with aclosing(_astream_once(transport, follow)) as events:
                    async for event, item in events:
                        backoff.reset()
                        if (run := finished_run(item)) is not None:
                            follow.on_run(run)
                            return run
                        if follow.triggers_check(event):
                            run = await _apoll_once(transport, follow, poll_timeout)
                            if run is not None and is_ready(run):
                                return run
            except ApiError as error:
                ride = follow.stream_failed(error)
        await asyncio.sleep(follow.pause(backoff))


async def _apoll_once(
    transport: AsyncTransport, follow: Follow, poll_timeout: float | None
) -> run_pb2.Run | None:
    """Async twin of :func:`_poll_once`."""
    if follow.deadline.expired():
        raise follow.on_timeout() from None
    timeout = follow.poll_deadline(poll_timeout, transport.settings.timeout)
    try:
        run = await transport.call(get_run(follow.run_id), timeout, retry=NO_RETRY)
    except ApiError as error:
        follow.resume_or_raise(error)
        return None
    follow.on_run(run)
    return run
