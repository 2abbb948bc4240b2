"""``AsyncClient.runs``: the async twin of :class:`spindle.resources.runs.Runs`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Unpack

from spindle import _create_stream, _paging, _requests
from spindle._encode import Order, ToolResultsSpec
from spindle._requests import Call, IdLike, RunOptions, RunOverrides, as_id
from spindle._run_base import AsyncEventCallback, AsyncTextCallback, AsyncToolCallsCallback
from spindle._transport import AsyncTransport
from spindle.async_run import AsyncRun
from spindle.enums import RunStatus
from spindle.results import RunEvent, RunResult
from spindle.retry import Deadline
from spindle.run import DEFAULT_WAIT
from spindle.tools import Tools
from spindle.types import RunStep
from spindle.v1 import run_pb2


class AsyncRuns:
    """Async twin of :class:`Runs`; methods return :class:`~spindle.async_run.AsyncRun` handles."""

    def __init__(self, transport: AsyncTransport) -> None:
        self.transport = transport
        """The channel and call wrapper that this resource and its handles use."""

    async def get_raw(self, run_id: IdLike, timeout: float | None = None) -> run_pb2.Run:
        """The run as the server's ``spindle.v1.Run`` proto (what handles are built from)."""
        return await self.transport.call(_requests.get_run(run_id), timeout)

    async def _handle(self, call: Call[run_pb2.Run, run_pb2.Run], timeout: float | None) -> AsyncRun:
        return AsyncRun(self, await self.transport.call(call, timeout))

    # ---- the API ----------------------------------------------------------------------------

    async def create(
        self,
        *,
        thread_id: IdLike,
        assistant_id: IdLike,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[RunOptions],
    ) -> AsyncRun:
        """Queue a run of the assistant on the thread; see ``Runs.create``."""
        return await self._handle(_requests.create_run(thread_id, assistant_id, options, request_id), timeout)

    async def get(self, run_id: IdLike, *, timeout: float | None = None) -> AsyncRun:
        """Get a run by id. Raises NotFound."""
        return await self._handle(_requests.get_run(run_id), timeout)

    async def get_last_by_thread(self, thread_id: IdLike, *, timeout: float | None = None) -> AsyncRun:
        """The thread's newest run. Raises NotFound if it has none."""
        return await self._handle(_requests.get_last_run(thread_id), timeout)

    def list(
        self,
        *,
        thread_id: IdLike | None = None,
        assistant_id: IdLike | None = None,
        statuses: Iterable[RunStatus] | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncRun]:
        """Runs matching every filter given (newest first unless ``order="asc"``), page by page."""
        listing = _requests.list_runs(
            lambda run: AsyncRun(self, run),
            thread_id=thread_id,
            assistant_id=assistant_id,
            statuses=statuses,
            labels=labels,
            page_size=page_size,
            order=order,
        )
        return _paging.aiterate(lambda token: self.transport.call(listing.page(token), timeout), limit)

    async def update(
        self,
        run_id: IdLike,
        *,
        labels: Mapping[str, str],
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncRun:
        """Replace the run's labels (the only field that can change)."""
        return await self._handle(_requests.update_run(run_id, labels, request_id), timeout)

    async def cancel(
        self, run_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> AsyncRun:
        """Cancel a run: PENDING and TOOL_CALLS end CANCELLED at once, IN_PROGRESS goes CANCELLING."""
        return await self._handle(_requests.cancel_run(run_id, request_id), timeout)

    async def submit_tool_results(
        self,
        run_id: IdLike,
        results: ToolResultsSpec,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncRun:
        """Answer every pending tool call of a TOOL_CALLS run (``{tool_call_id: output}``, outputs
        that are not strings sent as JSON); the run is queued again."""
        return await self._handle(_requests.submit_tool_results(run_id, results, request_id), timeout)

    async def wait(self, run_id: IdLike, *, timeout: float = 30.0) -> AsyncRun:
        """The server's long-poll: the run once it is finished or paused, or after ``timeout`` seconds
        (at most 600) as it is then. For a wait with a result and a typed timeout, use ``Run.wait``."""
        return await self._handle(_requests.wait_run(run_id, timeout), timeout + _requests.WAIT_MARGIN)

    def list_steps(
        self,
        run_id: IdLike,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[RunStep]:
        """The run's steps (newest first unless ``order="asc"``), page by page."""
        listing = _requests.list_steps(run_id, page_size, order)
        return _paging.aiterate(lambda token: self.transport.call(listing.page(token), timeout), limit)

    def listen(
        self, run_id: IdLike, *, events_start_idx: int = 0, timeout: float | None = DEFAULT_WAIT
    ) -> AsyncIterator[RunEvent]:
        """The run's events until the terminal one, reconnecting by itself; see ``Run.listen``."""
        handle = AsyncRun(self, run_pb2.Run(id=as_id(run_id)))
        return handle.listen(events_start_idx=events_start_idx, timeout=timeout)

    # ---- helpers ----------------------------------------------------------------------------

    async def poll(
        self, run_id: IdLike, *, timeout: float | None = DEFAULT_WAIT, poll_interval: float | None = None
    ) -> AsyncRun:
        """Wait until the run is finished or paused (OpenAI's ``poll``); returns the handle (check
        ``status``). RunTimeoutError after ``timeout`` seconds; see ``Run.wait``."""
        run = AsyncRun(self, run_pb2.Run(id=as_id(run_id)))
        await run.wait(timeout=timeout, poll_interval=poll_interval)
        return run

    async def create_and_poll(
        self,
        *,
        thread_id: IdLike,
        assistant_id: IdLike,
        timeout: float | None = DEFAULT_WAIT,
        poll_interval: float | None = None,
        request_id: str | None = None,
        **options: Unpack[RunOptions],
    ) -> AsyncRun:
        """Create a run and wait until it is finished or paused; returns the handle (check ``status``).

        ``timeout`` covers both; RunTimeoutError (with the handle) when it passes.
        """
        deadline = Deadline(timeout)
        run = await self._create_within(deadline, thread_id, assistant_id, request_id, options)
        await run.wait(timeout=deadline.remaining(), poll_interval=poll_interval)
        return run

    async def submit_tool_results_and_poll(
        self,
        run_id: IdLike,
        results: ToolResultsSpec,
        *,
        timeout: float | None = DEFAULT_WAIT,
        poll_interval: float | None = None,
        request_id: str | None = None,
    ) -> AsyncRun:
        """Submit tool results and wait until the run is finished or paused again; returns the handle."""
        deadline = Deadline(timeout)
        run = await self.submit_tool_results(
            run_id, results, request_id=request_id, timeout=deadline.cap(None)
        )
        await run.wait(timeout=deadline.remaining(), poll_interval=poll_interval)
        return run

    async def create_and_stream(
        self,
        *,
        thread_id: IdLike,
        assistant_id: IdLike,
        on_text: AsyncTextCallback | None = None,
        on_event: AsyncEventCallback | None = None,
        on_tool_calls: AsyncToolCallsCallback | None = None,
        tools: Tools | None = None,
        declare_tools: bool = False,
        timeout: float | None = DEFAULT_WAIT,
        request_id: str | None = None,
        **overrides: Unpack[RunOverrides],
    ) -> RunResult:
        """Create a run and stream it with callbacks (see ``Run.stream``); returns its result.

        One call, CreateAndListen, where the server has it (its first delta needs no second
        round trip): retried with the same ``request_id`` (generated if not given) if it fails
        before its first event, resumed with ListenBatches if it breaks later. A server without
        it (asked once per client) gets Create, then the run's stream.

        ``tools`` answer the run's tool calls; with ``declare_tools`` they are also declared as the
        run's tools (from their signatures), replacing the assistant's.
        """
        deadline = Deadline(timeout)
        options = _requests.options_with_tools(overrides, tools, declare_tools)
        create = _requests.create_run(thread_id, assistant_id, options, request_id)
        opened = (
            await _create_stream.aopen_created(self.transport, create, deadline)
            if self.transport.create_and_listen
            else None
        )
        if opened is None:
            run = AsyncRun(self, await self.transport.call(create, deadline.cap(None)))
            events = run.listen(timeout=deadline.remaining())
        else:
            run = AsyncRun(self, opened[0])
            events = run._listen_opened(opened[1], deadline.remaining())
        return await run._stream(events, on_text, on_event, on_tool_calls, tools, deadline.remaining())

    async def create_and_run(
        self,
        *,
        thread_id: IdLike,
        assistant_id: IdLike,
        tools: Tools,
        declare_tools: bool = False,
        timeout: float | None = DEFAULT_WAIT,
        poll_interval: float | None = None,
        request_id: str | None = None,
        **overrides: Unpack[RunOverrides],
    ) -> RunResult:
        """Create a run and see it to the end, answering its tool calls with ``tools`` (several
        calls of one pause in parallel); see ``Run.run_until_done``."""
        deadline = Deadline(timeout)
        options = _requests.options_with_tools(overrides, tools, declare_tools)
        run = await self._create_within(deadline, thread_id, assistant_id, request_id, options)
        return await run.run_until_done(tools, timeout=deadline.remaining(), poll_interval=poll_interval)

    async def _create_within(
        self,
        deadline: Deadline,
        thread_id: IdLike,
        assistant_id: IdLike,
        request_id: str | None,
        options: RunOptions,
    ) -> AsyncRun:
        """``create`` as the first step of a helper whose ``timeout`` is ``deadline``."""
        return await self.create(
            thread_id=thread_id,
            assistant_id=assistant_id,
            request_id=request_id,
            timeout=deadline.cap(None),
            **options,
        )
