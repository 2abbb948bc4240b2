"""What the sync and async run handles share: the snapshot they keep and how events update it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from spindle import _decode
from spindle._events import EventCursor
from spindle._follow import Follow
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

    @property
    def result(self) -> RunResult:
        """The result this snapshot stands for (no call; see ``get_result()`` for a fresh one)."""
        return RunResult.from_run(self)

    def _follow(self, cursor: EventCursor, timeout: float | None, retry: RetryPolicy) -> Follow:
        seconds = timeout
        handle = cast("Run | AsyncRun", self)  # the base is only ever one of the two

        def timed_out() -> Exception:
            what = f"after {seconds:g} s" if seconds is not None else "when its deadline passed"
            return RunTimeoutError(f"run {self.id} is still {self.status.name} {what}", handle)

        return Follow(
            run_id=self.id,
            cursor=cursor,
            deadline=Deadline(timeout),
            retry=retry,
            on_event=self._observe,
            on_run=self._absorb,
            on_timeout=timed_out,
        )

    def _is_current_pause(self, calls: tuple[ToolCall, ...]) -> bool:
        """The snapshot is paused on exactly these calls (not an old, answered round)."""
        return self.status.is_paused and {c.id for c in self.required_tool_calls} == {c.id for c in calls}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, status={self.status.name}, thread_id={self.thread_id!r})"
        )


TextCallback = Callable[[str, str], None]
"""``on_text(delta, text_so_far)``; ``text_so_far`` restarts when the server voids a partial reply."""

EventCallback = Callable[[RunEvent], None]
"""``on_event(event)`` for every event."""

ToolCallsCallback = Callable[[tuple[ToolCall, ...]], None]
"""``on_tool_calls(calls)`` when the run pauses for tool results."""
