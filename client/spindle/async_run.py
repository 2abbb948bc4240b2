"""``AsyncRun``: the async twin of :class:`spindle.run.Run`.

Everything ``Run`` does, awaited; plus ``await run`` (waits) and ``async for event in run``
(listens from the first event). Tool functions may be ``async def`` or plain (run in threads).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from spindle import _follow
from spindle._encode import Order, ToolResultsSpec
from spindle._events import EventCursor
from spindle._run_base import (
    AsyncEventCallback,
    AsyncTextCallback,
    AsyncToolCallsCallback,
    RunHandleBase,
)
from spindle.enums import RunStatus
from spindle.results import RunEvent, RunResult
from spindle.retry import Deadline
from spindle.run import DEFAULT_WAIT as DEFAULT_WAIT  # one default for both twins
from spindle.tools import ToolFunctions, Tools, as_tool_functions, run_tool_calls_async
from spindle.types import RunStep, ToolCall
from spindle.v1 import run_pb2

if TYPE_CHECKING:
    from spindle.resources.async_runs import AsyncRuns


class AsyncRun(RunHandleBase):
    """A run on the server, with its fields as last seen. Get one from ``client.runs``."""

    def __init__(self, runs: AsyncRuns, run: run_pb2.Run) -> None:
        self._runs = runs
        self._seen = 0
        self._absorb(run)

    # ---- state ----------------------------------------------------------------------------

    async def refresh(self, *, timeout: float | None = None) -> AsyncRun:
        """Read the run again; returns this handle."""
        self._absorb(await self._runs.get_raw(self.id, timeout))
        return self

    async def get_status(self, *, timeout: float | None = None) -> RunStatus:
        """The run's current status (reads it from the server)."""
        return (await self.refresh(timeout=timeout)).status

    async def get_result(self, *, timeout: float | None = None) -> RunResult:
        """The run's result as it stands now (reads it from the server; check ``result.status``)."""
        return (await self.refresh(timeout=timeout)).result

    def steps(
        self, *, page_size: int | None = None, order: Order = None, timeout: float | None = None
    ) -> AsyncIterator[RunStep]:
        """The run's steps: its tool-call rounds (with the outputs given) and the reply's creation."""
        return self._runs.list_steps(self.id, page_size=page_size, order=order, timeout=timeout)

    # ---- follow ---------------------------------------------------------------------------

    async def wait(
        self,
        *,
        timeout: float | None = DEFAULT_WAIT,
        poll_interval: float | None = None,
        poll_timeout: float | None = None,
    ) -> RunResult:
        """Wait until the run is finished or paused for tool results, and return its result.

        Same contract as ``Run.wait``: one wall-clock ``timeout`` (``RunTimeoutError`` keeps the
        run), the event stream first, polling Get with jittered backoff when the stream fails.
        """
        if self.status.is_finished:
            return self.result
        follow = self._follow(EventCursor(self._seen), timeout, self._runs.transport.settings.retry)
        # the handle takes the run from each Get of the wait (``on_run``), the last one included
        await _follow.await_run(
            self._runs.transport, follow, poll_interval=poll_interval, poll_timeout=poll_timeout
        )
        return self.result

    def __await__(self) -> Generator[Any, None, RunResult]:
        """``await run``: ``wait()`` with its defaults."""
        return self.wait().__await__()

    def listen(
        self, *, events_start_idx: int = 0, timeout: float | None = DEFAULT_WAIT
    ) -> AsyncGenerator[RunEvent, None]:
        """The run's events until the terminal one; reconnects from the last index + 1 by itself."""
        follow = self._follow(EventCursor(events_start_idx), timeout, self._runs.transport.settings.retry)
        return _follow.alisten(self._runs.transport, follow)

    def __aiter__(self) -> AsyncIterator[RunEvent]:
        """``async for event in run``: listen from the first event."""
        return self.listen()

    # ---- act ------------------------------------------------------------------------------

    async def submit_tool_results(
        self, results: ToolResultsSpec, *, request_id: str | None = None, timeout: float | None = None
    ) -> AsyncRun:
        """Answer every pending tool call: ``{tool_call_id: output}`` (non-strings sent as JSON)."""
        submitted = await self._runs.submit_tool_results(
            self.id, results, request_id=request_id, timeout=timeout
        )
        self._assign(submitted)
        return self

    async def submit_tool_results_and_poll(
        self,
        results: ToolResultsSpec,
        *,
        timeout: float | None = DEFAULT_WAIT,
        poll_interval: float | None = None,
        request_id: str | None = None,
    ) -> RunResult:
        """Submit tool results, then ``wait()``; ``timeout`` covers both."""
        deadline = Deadline(timeout)
        await self.submit_tool_results(results, request_id=request_id, timeout=self._call_timeout(deadline))
        return await self.wait(timeout=deadline.remaining(), poll_interval=poll_interval)

    async def cancel(self, *, request_id: str | None = None, timeout: float | None = None) -> AsyncRun:
        """Ask the run to stop (a finished run stays as it is); returns this handle."""
        self._assign(await self._runs.cancel(self.id, request_id=request_id, timeout=timeout))
        return self

    async def update(
        self, *, labels: Mapping[str, str], request_id: str | None = None, timeout: float | None = None
    ) -> AsyncRun:
        """Replace the run's labels; returns this handle."""
        self._assign(await self._runs.update(self.id, labels=labels, request_id=request_id, timeout=timeout))
        return self

    # ---- helpers --------------------------------------------------------------------------

    async def run_until_done(
        self, tools: Tools, *, timeout: float | None = DEFAULT_WAIT, poll_interval: float | None = None
    ) -> RunResult:
        """Wait, answering every TOOL_CALLS pause with your functions, until the run finishes.

        Several calls of one pause run concurrently (``asyncio.gather``; plain functions in
        threads). Same contract as ``Run.run_until_done``.
        """
        functions = as_tool_functions(tools)
        deadline = Deadline(timeout)
        while True:
            result = await self.wait(timeout=deadline.remaining(), poll_interval=poll_interval)
            if not result.is_paused or result.tool_calls is None:
                return result
            outputs = await run_tool_calls_async(functions, result.tool_calls, self)
            await self.submit_tool_results(outputs, timeout=self._call_timeout(deadline))

    async def stream(
        self,
        *,
        on_text: AsyncTextCallback | None = None,
        on_event: AsyncEventCallback | None = None,
        on_tool_calls: AsyncToolCallsCallback | None = None,
        tools: Tools | None = None,
        events_start_idx: int = 0,
        timeout: float | None = DEFAULT_WAIT,
    ) -> RunResult:
        """Listen to the run, calling your callbacks (plain or ``async def``), and return its
        result; see ``Run.stream``."""
        events = self.listen(events_start_idx=events_start_idx, timeout=timeout)
        return await self._stream(events, on_text, on_event, on_tool_calls, tools, timeout)

    def _listen_opened(
        self, opened: _follow.AsyncBatches, timeout: float | None
    ) -> AsyncGenerator[RunEvent, None]:
        """``listen()`` from index 0 on a stream already under way (CreateAndListen's)."""
        follow = self._follow(EventCursor(0), timeout, self._runs.transport.settings.retry)
        return _follow.alisten(self._runs.transport, follow, opened)

    async def _stream(
        self,
        listened: AsyncGenerator[RunEvent, None],
        on_text: AsyncTextCallback | None,
        on_event: AsyncEventCallback | None,
        on_tool_calls: AsyncToolCallsCallback | None,
        tools: Tools | None,
        timeout: float | None,
    ) -> RunResult:
        """``stream()`` over the events of ``listened``."""
        functions = as_tool_functions(tools) if tools is not None else None
        deadline = Deadline(timeout)
        async with aclosing(listened) as events:
            async for event in events:
                for returned in self._callbacks(event, on_event, on_text):
                    await _settle(returned)
                calls = self._pause_of(event)
                if calls is not None and await self._answer_pause(calls, functions, on_tool_calls, deadline):
                    return self.result
                if event.is_terminal:
                    return self.result
        return (await self.refresh(timeout=self._call_timeout(deadline))).result

    async def _answer_pause(
        self,
        calls: tuple[ToolCall, ...],
        functions: ToolFunctions | None,
        on_tool_calls: AsyncToolCallsCallback | None,
        deadline: Deadline,
    ) -> bool:
        """Handle a TOOL_CALLS event; True if it is a pause to return to the caller."""
        await self.refresh(timeout=self._call_timeout(deadline))
        if not self._is_current_pause(calls):
            return False
        if on_tool_calls is not None:
            await _settle(on_tool_calls(self.required_tool_calls))
        if functions is not None and self.status.is_paused:
            outputs = await run_tool_calls_async(functions, self.required_tool_calls, self)
            await self.submit_tool_results(outputs, timeout=self._call_timeout(deadline))
            return False
        return self.status.is_paused


async def _settle(value: object) -> None:
    """Await what an ``async def`` callback returned (a plain one returned None)."""
    if inspect.isawaitable(value):
        await value
