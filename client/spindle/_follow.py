"""Following a run: ``listen`` (a resumable event stream) and ``wait`` (Listen, else polling Get).

Sync and async twins side by side; the decisions are shared: :class:`EventCursor` keeps the place
(so a reconnect resumes at last index + 1, no gap, no duplicate), :func:`is_ready` says when a
wait is over (terminal, or paused in TOOL_CALLS), :func:`poll_policy` is the fallback's backoff.

``wait`` first reads the run with Get (it may be ready already), then rides the stream from the
handle's place. The stream is only a trigger: on a terminal or TOOL_CALLS event it reads the run
with Get and returns when Get says the run is ready. An old TOOL_CALLS event replayed from the log
(already answered) therefore never ends a wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Generator
from contextlib import closing
from dataclasses import dataclass

from spindle._events import EventCursor
from spindle._transport import AsyncTransport, SyncTransport
from spindle.enums import EventType, RunStatus
from spindle.errors import ApiError, Cancelled
from spindle.results import RunEvent
from spindle.retry import NO_RETRY, Deadline, RetryPolicy
from spindle.v1 import run_pb2

DEFAULT_POLL_INTERVAL = 0.2
MAX_POLL_INTERVAL = 2.0


def is_ready(run: run_pb2.Run) -> bool:
    """A wait is over: the run is terminal or paused for tool results."""
    status = RunStatus(run.status)
    return status.is_finished or status.is_paused


def poll_policy(poll_interval: float | None) -> RetryPolicy:
    """Jittered backoff between fallback polls: from ``poll_interval`` growing 1.5x up to 2 s."""
    initial = DEFAULT_POLL_INTERVAL if poll_interval is None else poll_interval
    return RetryPolicy(initial=initial, maximum=max(initial, MAX_POLL_INTERVAL), multiplier=1.5)


@dataclass(frozen=True, slots=True)
class Follow:
    """What one listen or wait needs besides the transport."""

    run_id: str
    cursor: EventCursor
    deadline: Deadline
    retry: RetryPolicy
    on_event: Callable[[RunEvent], None]
    on_run: Callable[[run_pb2.Run], None]
    on_timeout: Callable[[], Exception]

    def triggers_check(self, event: RunEvent) -> bool:
        return event.is_terminal or event.type is EventType.TOOL_CALLS

    def resume_or_raise(self, error: ApiError) -> None:
        """Return if ``error`` is transient and time is left (reconnect, or poll); raise otherwise:
        the timeout error once the deadline has passed, else ``error`` itself.

        Transient: what the retry policy retries (UNAVAILABLE: connection refused or dropped),
        and CANCELLED, which a server that shuts down gives the calls it still has (this client
        never cancels a call it still waits for).
        """
        if self.deadline.expired():
            raise self.timed_out(error) from error
        if not (self.retry.is_retryable(error) or isinstance(error, Cancelled)):
            raise error

    def listen_request(self) -> run_pb2.ListenRunRequest:
        return run_pb2.ListenRunRequest(run_id=self.run_id, events_start_idx=self.cursor.next_index)

    def get_request(self) -> run_pb2.GetRunRequest:
        return run_pb2.GetRunRequest(run_id=self.run_id)

    def timed_out(self, error: ApiError | None = None) -> Exception:
        timeout = self.on_timeout()
        timeout.__cause__ = error
        return timeout


# ---- sync -------------------------------------------------------------------------------------


def _stream_once(transport: SyncTransport, follow: Follow) -> Generator[RunEvent, None, None]:
    """One Listen call from the cursor; yields new events (observed), raises ApiError on failure."""
    request = follow.listen_request()
    timeout = follow.deadline.remaining()
    for raw in transport.stream(transport.runs.Listen, request, run_pb2.StreamEvent, timeout=timeout):
        event = follow.cursor.accept(raw)
        if event is not None:
            follow.on_event(event)
            yield event


def listen(transport: SyncTransport, follow: Follow) -> Generator[RunEvent, None, None]:
    """Events until the terminal one; reconnects after retryable failures until the deadline."""
    backoff = follow.retry.backoff()
    while not follow.cursor.finished:
        received = False
        try:
            with closing(_stream_once(transport, follow)) as events:
                for event in events:
                    received = True
                    backoff.reset()
                    yield event
        except ApiError as error:
            follow.resume_or_raise(error)
            time.sleep(follow.deadline.cap(backoff.next_delay()) or 0.0)
            continue
        if not received:
            return  # the server had nothing after our index: we started past the end


def wait(
    transport: SyncTransport, follow: Follow, *, poll_interval: float | None, poll_timeout: float | None
) -> run_pb2.Run:
    """The run once it is terminal or paused: rides Listen, falls back to polling Get."""
    backoff = poll_policy(poll_interval).backoff()
    first = _poll_once(transport, follow, poll_timeout)
    if first is not None and is_ready(first):
        return first
    while True:
        try:
            with closing(_stream_once(transport, follow)) as events:
                for event in events:
                    backoff.reset()
                    if follow.triggers_check(event):
                        run = transport.unary(
                            transport.runs.Get,
                            follow.get_request(),
                            run_pb2.Run,
                            timeout=follow.deadline.cap(transport.settings.timeout),
                        )
                        follow.on_run(run)
                        if is_ready(run):
                            return run
        except ApiError as error:
            follow.resume_or_raise(error)
        run_or_none = _poll_once(transport, follow, poll_timeout)
        if run_or_none is not None and is_ready(run_or_none):
            return run_or_none
        if follow.deadline.expired():
            raise follow.timed_out()
        time.sleep(follow.deadline.cap(backoff.next_delay()) or 0.0)


def _poll_once(transport: SyncTransport, follow: Follow, poll_timeout: float | None) -> run_pb2.Run | None:
    if follow.deadline.expired():
        raise follow.timed_out()
    try:
        run = transport.unary(
            transport.runs.Get,
            follow.get_request(),
            run_pb2.Run,
            timeout=follow.deadline.cap(poll_timeout or transport.settings.timeout),
            retry=NO_RETRY,
        )
    except ApiError as error:
        follow.resume_or_raise(error)
        return None
    follow.on_run(run)
    return run


# ---- async ------------------------------------------------------------------------------------


async def _astream_once(transport: AsyncTransport, follow: Follow) -> AsyncGenerator[RunEvent, None]:
    request = follow.listen_request()
    timeout = follow.deadline.remaining()
    stream = transport.stream(transport.runs.Listen, request, run_pb2.StreamEvent, timeout=timeout)
    try:
        async for raw in stream:
            event = follow.cursor.accept(raw)
            if event is not None:
                follow.on_event(event)
                yield event
    finally:
        await stream.aclose()


async def alisten(transport: AsyncTransport, follow: Follow) -> AsyncGenerator[RunEvent, None]:
    """Async twin of :func:`listen`."""
    backoff = follow.retry.backoff()
    while not follow.cursor.finished:
        received = False
        attempt = _astream_once(transport, follow)
        try:
            async for event in attempt:
                received = True
                backoff.reset()
                yield event
        except ApiError as error:
            follow.resume_or_raise(error)
            await asyncio.sleep(follow.deadline.cap(backoff.next_delay()) or 0.0)
            continue
        finally:
            await attempt.aclose()
        if not received:
            return


async def await_run(
    transport: AsyncTransport, follow: Follow, *, poll_interval: float | None, poll_timeout: float | None
) -> run_pb2.Run:
    """Async twin of :func:`wait`."""
    backoff = poll_policy(poll_interval).backoff()
    first = await _apoll_once(transport, follow, poll_timeout)
    if first is not None and is_ready(first):
        return first
    while True:
        attempt = _astream_once(transport, follow)
        try:
            async for event in attempt:
                backoff.reset()
                if follow.triggers_check(event):
                    run = await transport.unary(
                        transport.runs.Get,
                        follow.get_request(),
                        run_pb2.Run,
                        timeout=follow.deadline.cap(transport.settings.timeout),
                    )
                    follow.on_run(run)
                    if is_ready(run):
                        return run
        except ApiError as error:
            follow.resume_or_raise(error)
        finally:
            await attempt.aclose()
        run_or_none = await _apoll_once(transport, follow, poll_timeout)
        if run_or_none is not None and is_ready(run_or_none):
            return run_or_none
        if follow.deadline.expired():
            raise follow.timed_out()
        await asyncio.sleep(follow.deadline.cap(backoff.next_delay()) or 0.0)


async def _apoll_once(
    transport: AsyncTransport, follow: Follow, poll_timeout: float | None
) -> run_pb2.Run | None:
    if follow.deadline.expired():
        raise follow.timed_out()
    try:
        run = await transport.unary(
            transport.runs.Get,
            follow.get_request(),
            run_pb2.Run,
            timeout=follow.deadline.cap(poll_timeout or transport.settings.timeout),
            retry=NO_RETRY,
        )
    except ApiError as error:
        follow.resume_or_raise(error)
        return None
    follow.on_run(run)
    return run
