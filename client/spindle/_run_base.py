"""What the sync and async run handles share: the snapshot they keep and how events update it."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, cast

from spindle import _decode
from spindle._events import EventCursor
from spindle._follow import Follow
from spindle.enums import EventType
from spindle.errors import RunTimeoutError
from spindle.results import RunEvent, RunResult
from spindle.retry import Deadline, RetryPolicy
from spindle.types import RunData, ToolCall
from spindle.v1 import run_pb2

if TYPE_CHECKING:
    from spindle.async_run import AsyncRun
    from spindle.run import Run

_FIELDS = tuple(field.name for field in dataclasses.fields(RunData))


class RunHandleBase(RunData):
    """A run's fields as last seen, kept current by every call and event of the handle."""

    _seen: int

    def _assign(self, data: RunData) -> None:
        for name in _FIELDS:
            setattr(self, name, getattr(data, name))

    def _absorb(self, run: run_pb2.Run) -> None:
        """Take the run as the server just returned it."""
        self._assign(_decode.run_data(run))

    def _observe(self, event: RunEvent) -> None:
        """Take what a new event says about the run (replayed older events change nothing)."""
        if event.index < self._seen:
            return
        self._seen = event.index + 1
        if event.run is not None:
            self._assign(event.run)
        self.status = event.status
        if event.tool_calls is not None:
            self.required_tool_calls = event.tool_calls
        if event.type is EventType.DONE:  # the outcome, so that ``result`` needs no other call
            self.reply = event.message
            self.usage = event.usage or self.usage
        elif event.error is not None:
            self.last_error = event.error

    @property
    def result(self) -> RunResult:
        """The result this snapshot stands for (no call; see ``get_result()`` for a fresh one)."""
        return RunResult.from_run(self)

    def _follow(self, cursor: EventCursor, timeout: float | None, retry: RetryPolicy) -> Follow:
        return Follow(
            run_id=self.id,
            cursor=cursor,
            deadline=Deadline(timeout),
            retry=retry,
            on_event=self._observe,
            on_run=self._absorb,
            on_timeout=lambda: self._timed_out(timeout),
        )

    def _timed_out(self, seconds: float | None) -> RunTimeoutError:
        """The error of a follow of ``seconds`` (None: a helper's deadline) that ran out of time."""
        what = f"after {seconds:g} s" if seconds is not None else "when its deadline passed"
        return RunTimeoutError(f"run {self.id} is still {self.status.name} {what}", self._me)

    def _is_current_pause(self, calls: tuple[ToolCall, ...]) -> bool:
        """The snapshot is paused on exactly these calls (not an old, answered round)."""
        return self.status.is_paused and {c.id for c in self.required_tool_calls} == {c.id for c in calls}

    def _call_timeout(self, deadline: Deadline) -> float | None:
        """The deadline of one call made by a helper with this overall ``deadline`` (None: the
        client's own); RunTimeoutError (with this handle) once it has passed."""
        if deadline.expired():
            raise self._timed_out(None)
        return deadline.cap(None)

    @property
    def _me(self) -> Run | AsyncRun:
        return cast("Run | AsyncRun", self)  # the base is only ever one of the two

    @staticmethod
    def _callbacks(
        event: RunEvent,
        on_event: Callable[[RunEvent], object] | None,
        on_text: Callable[[str, str], object] | None,
    ) -> Iterator[object]:
        """Call the callbacks an event is for, one by one as this is iterated; yields what each
        returned (the async handle awaits what is awaitable before the next one is called)."""
        if on_event is not None:
            yield on_event(event)
        if event.delta is not None and on_text is not None:
            yield on_text(event.delta, event.text)

    @staticmethod
    def _pause_of(event: RunEvent) -> tuple[ToolCall, ...] | None:
        """The calls of a TOOL_CALLS event (maybe an old round replayed: check), else None."""
        return event.tool_calls if event.type is EventType.TOOL_CALLS else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, status={self.status.name}, thread_id={self.thread_id!r})"
        )


TextCallback = Callable[[str, str], None]
"""``on_text(delta, text_so_far)``; when the server retries a turn (``discard_partial_message``),
``text_so_far`` drops that turn's text and goes on from what came before it."""

EventCallback = Callable[[RunEvent], None]
"""``on_event(event)`` for every event."""

ToolCallsCallback = Callable[[tuple[ToolCall, ...]], None]
"""``on_tool_calls(calls)`` when the run pauses for tool results."""

AsyncTextCallback = Callable[[str, str], Awaitable[None] | None]
"""``TextCallback`` for ``AsyncRun``: a plain function or an ``async def`` (awaited)."""

AsyncEventCallback = Callable[[RunEvent], Awaitable[None] | None]
"""``EventCallback`` for ``AsyncRun``: a plain function or an ``async def`` (awaited)."""

AsyncToolCallsCallback = Callable[[tuple[ToolCall, ...]], Awaitable[None] | None]
"""``ToolCallsCallback`` for ``AsyncRun``: a plain function or an ``async def`` (awaited)."""
