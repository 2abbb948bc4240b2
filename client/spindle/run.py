"""``Run``: the Operation-style handle of one run (sync). See ``AsyncRun`` for the async twin.

A handle carries the run's fields as last seen (``run.status``, ``run.required_tool_calls``,
``run.reply``, ...), refreshed by every call and event, and follows the run:

* ``wait()`` rides the event stream (ListenBatches, else Listen) and returns within milliseconds
  of the run finishing, falls back to polling Get with jittered backoff when the stream fails,
  has one wall-clock ``timeout`` and returns a TOOL_CALLS pause as such (``result.tool_calls``
  set, ``is_finished`` false);
* ``listen()`` yields events one by one (a backlog arrives batched) and reconnects by itself from
  the last index + 1;
* ``stream()`` and ``run_until_done()`` answer tool calls with your Python functions.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from contextlib import closing
from typing import TYPE_CHECKING

from spindle import _follow
from spindle._encode import Order, ToolResultsSpec
from spindle._events import EventCursor
from spindle._run_base import EventCallback, RunHandleBase, TextCallback, ToolCallsCallback
from spindle.enums import RunStatus
from spindle.results import RunEvent, RunResult
from spindle.retry import Deadline
from spindle.tools import ToolFunctions, Tools, as_tool_functions, run_tool_calls
from spindle.types import RunStep, ToolCall
from spindle.v1 import run_pb2

if TYPE_CHECKING:
    from spindle.resources.runs import Runs

DEFAULT_WAIT = 60.0
"""The default ``timeout`` (seconds) of following a run, for ``Run``, ``AsyncRun`` and the resources."""


class Run(RunHandleBase):
    """A run on the server, with its fields as last seen. Get one from ``client.runs``."""

    def __init__(self, runs: Runs, run: run_pb2.Run) -> None:
        self._runs = runs
        self._seen = 0
        self._absorb(run)

    # ---- state ----------------------------------------------------------------------------

    def refresh(self, *, timeout: float | None = None) -> Run:
        """Read the run again; returns this handle."""
        self._absorb(self._runs.get_raw(self.id, timeout))
        return self

    def get_status(self, *, timeout: float | None = None) -> RunStatus:
        """The run's current status (reads it from the server)."""
        return self.refresh(timeout=timeout).status

    def get_result(self, *, timeout: float | None = None) -> RunResult:
        """The run's result as it stands now (reads it from the server; check ``result.status``)."""
        return self.refresh(timeout=timeout).result

    def steps(
        self, *, page_size: int | None = None, order: Order = None, timeout: float | None = None
    ) -> Iterator[RunStep]:
        """The run's steps: its tool-call rounds (with the outputs given) and the reply's creation."""
        return self._runs.list_steps(self.id, page_size=page_size, order=order, timeout=timeout)

    # ---- follow ---------------------------------------------------------------------------

    def wait(
        self,
        *,
        timeout: float | None = DEFAULT_WAIT,
        poll_interval: float | None = None,
        poll_timeout: float | None = None,
    ) -> RunResult:
        """Block until the run is finished or paused for tool results, and return its result.

        Args:
            timeout: wall-clock seconds for the whole wait (None: no limit). When it passes,
                ``RunTimeoutError`` is raised; its ``run`` is this handle and the run goes on.
            poll_interval: first delay of the fallback polling (it grows with jitter up to 2 s).
            poll_timeout: deadline of each fallback Get (default: the client's timeout).
        """
        if self.status.is_finished:
            return self.result
        follow = self._follow(EventCursor(self._seen), timeout, self._runs.transport.settings.retry)
        # the handle takes the run from each Get of the wait (``on_run``), the last one included
        _follow.wait(self._runs.transport, follow, poll_interval=poll_interval, poll_timeout=poll_timeout)
        return self.result

    def listen(
        self, *, events_start_idx: int = 0, timeout: float | None = DEFAULT_WAIT
    ) -> Generator[RunEvent, None, None]:
        """The run's events from ``events_start_idx`` until the terminal one.

        Stays open across TOOL_CALLS pauses. After UNAVAILABLE or a dropped connection it
        reconnects from the last index + 1 (no gap, no duplicate). ``timeout`` is wall-clock for
        the whole listen; when it passes, ``RunTimeoutError`` is raised.
        """
        follow = self._follow(EventCursor(events_start_idx), timeout, self._runs.transport.settings.retry)
        return _follow.listen(self._runs.transport, follow)

    def __iter__(self) -> Iterator[RunEvent]:
        """``for event in run``: listen from the first event."""
        return self.listen()

    # ---- act ------------------------------------------------------------------------------

    def submit_tool_results(
        self, results: ToolResultsSpec, *, request_id: str | None = None, timeout: float | None = None
    ) -> Run:
        """Answer every pending tool call: ``{tool_call_id: output}`` (non-strings sent as JSON)."""
        self._assign(self._runs.submit_tool_results(self.id, results, request_id=request_id, timeout=timeout))
        return self

    def submit_tool_results_and_poll(
        self,
        results: ToolResultsSpec,
        *,
        timeout: float | None = DEFAULT_WAIT,
        poll_interval: float | None = None,
        request_id: str | None = None,
    ) -> RunResult:
        """Submit tool results, then ``wait()``; ``timeout`` covers both."""
        deadline = Deadline(timeout)
        self.submit_tool_results(results, request_id=request_id, timeout=self._call_timeout(deadline))
        return self.wait(timeout=deadline.remaining(), poll_interval=poll_interval)

    def cancel(self, *, request_id: str | None = None, timeout: float | None = None) -> Run:
        """Ask the run to stop (a finished run stays as it is); returns this handle."""
        self._assign(self._runs.cancel(self.id, request_id=request_id, timeout=timeout))
        return self

    def update(
        self, *, labels: Mapping[str, str], request_id: str | None = None, timeout: float | None = None
    ) -> Run:
        """Replace the run's labels; returns this handle."""
        self._assign(self._runs.update(self.id, labels=labels, request_id=request_id, timeout=timeout))
        return self

    # ---- helpers --------------------------------------------------------------------------

    def run_until_done(
        self, tools: Tools, *, timeout: float | None = DEFAULT_WAIT, poll_interval: float | None = None
    ) -> RunResult:
        """Wait, answering every TOOL_CALLS pause with your functions, until the run finishes.

        Several calls of one pause run concurrently in threads (``async def`` functions too, each
        run to its end). ``timeout`` covers it all. Raises ToolExecutionError if a function is
        missing or raises (the run stays paused), RunTimeoutError when the time is up.
        """
        functions = as_tool_functions(tools)
        deadline = Deadline(timeout)
        while True:
            result = self.wait(timeout=deadline.remaining(), poll_interval=poll_interval)
            if not result.is_paused or result.tool_calls is None:
                return result
            outputs = run_tool_calls(functions, result.tool_calls, self)
            self.submit_tool_results(outputs, timeout=self._call_timeout(deadline))

    def stream(
        self,
        *,
        on_text: TextCallback | None = None,
        on_event: EventCallback | None = None,
        on_tool_calls: ToolCallsCallback | None = None,
        tools: Tools | None = None,
        events_start_idx: int = 0,
        timeout: float | None = DEFAULT_WAIT,
    ) -> RunResult:
        """Listen to the run, calling your callbacks, and return its result.

        ``on_text(delta, text_so_far)`` for each piece of the reply, ``on_event(event)`` for every
        event, ``on_tool_calls(calls)`` at a pause. At a pause, ``tools`` (if given) answer the
        calls and the stream goes on; otherwise the pause is returned (unless ``on_tool_calls``
        submitted results itself with ``run.submit_tool_results``). ``timeout`` covers it all.
        """
        events = self.listen(events_start_idx=events_start_idx, timeout=timeout)
        return self._stream(events, on_text, on_event, on_tool_calls, tools, timeout)

    def _listen_opened(
        self, opened: _follow.Batches, timeout: float | None
    ) -> Generator[RunEvent, None, None]:
        """``listen()`` from index 0 on a stream already under way (CreateAndListen's)."""
        follow = self._follow(EventCursor(0), timeout, self._runs.transport.settings.retry)
        return _follow.listen(self._runs.transport, follow, opened)

    def _stream(
        self,
        listened: Generator[RunEvent, None, None],
        on_text: TextCallback | None,
        on_event: EventCallback | None,
        on_tool_calls: ToolCallsCallback | None,
        tools: Tools | None,
        timeout: float | None,
    ) -> RunResult:
        """``stream()`` over the events of ``listened``."""
        functions = as_tool_functions(tools) if tools is not None else None
        deadline = Deadline(timeout)
        with closing(listened) as events:
            for event in events:
                for _ in self._callbacks(event, on_event, on_text):
                    pass
                calls = self._pause_of(event)
                if calls is not None and self._answer_pause(calls, functions, on_tool_calls, deadline):
                    return self.result
                if event.is_terminal:
                    return self.result  # the events brought the outcome
        return self.refresh(timeout=self._call_timeout(deadline)).result  # started past the end

    def _answer_pause(
        self,
        calls: tuple[ToolCall, ...],
        functions: ToolFunctions | None,
        on_tool_calls: ToolCallsCallback | None,
        deadline: Deadline,
    ) -> bool:
        """Handle a TOOL_CALLS event; True if it is a pause to return to the caller."""
        self.refresh(timeout=self._call_timeout(deadline))
        if not self._is_current_pause(calls):
            return False  # an earlier round replayed from the log, already answered
        if on_tool_calls is not None:
            on_tool_calls(self.required_tool_calls)
        if functions is not None and self.status.is_paused:
            outputs = run_tool_calls(functions, self.required_tool_calls, self)
            self.submit_tool_results(outputs, timeout=self._call_timeout(deadline))
            return False
        return self.status.is_paused
