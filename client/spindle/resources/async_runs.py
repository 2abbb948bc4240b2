"""``AsyncClient.runs``: the async twin of :class:`spindle.resources.runs.Runs`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Unpack

from google.protobuf.message import Message

from spindle import _decode, _encode, _paging, _requests
from spindle._encode import Order, ToolResultsSpec
from spindle._requests import IdLike, RunOptions, RunOverrides, as_id
from spindle._run_base import EventCallback, TextCallback, ToolCallsCallback
from spindle._transport import AsyncTransport, Method
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

    async def get_raw(self, run_id: str, timeout: float | None = None) -> run_pb2.Run:
        """The run as the server's ``spindle.v1.Run`` proto (what handles are built from)."""
        request = run_pb2.GetRunRequest(run_id=run_id)
        return await self.transport.unary(self.transport.runs.Get, request, run_pb2.Run, timeout=timeout)

    async def _mutate(
        self, method: Method, request: Message, request_id: str, timeout: float | None
    ) -> AsyncRun:
        run = await self.transport.unary(method, request, run_pb2.Run, timeout=timeout, request_id=request_id)
        return AsyncRun(self, run)

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
        rid = _encode.request_id(request_id)
        request = _requests.create_run(as_id(thread_id), as_id(assistant_id), options, rid)
        return await self._mutate(self.transport.runs.Create, request, rid, timeout)

    async def get(self, run_id: IdLike, *, timeout: float | None = None) -> AsyncRun:
        """Get a run by id. Raises NotFound."""
        return AsyncRun(self, await self.get_raw(as_id(run_id), timeout))

    async def get_last_by_thread(self, thread_id: IdLike, *, timeout: float | None = None) -> AsyncRun:
        """The thread's newest run. Raises NotFound if it has none."""
        request = run_pb2.GetLastRunByThreadRequest(thread_id=as_id(thread_id))
        stub = self.transport.runs
        return AsyncRun(
            self, await self.transport.unary(stub.GetLastByThread, request, run_pb2.Run, timeout=timeout)
        )

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
        """Runs matching every filter given, page by page as you ``async for`` over them."""
        request = _requests.list_runs(
            thread_id=as_id(thread_id) if thread_id is not None else None,
            assistant_id=as_id(assistant_id) if assistant_id is not None else None,
            statuses=statuses,
            labels=labels,
            page_size=page_size,
            order=order,
        )

        async def fetch(token: str) -> _paging.Page[AsyncRun]:
            request.page_token = token
            stub = self.transport.runs
            page = await self.transport.unary(stub.List, request, run_pb2.ListRunsResponse, timeout=timeout)
            return [AsyncRun(self, r) for r in page.runs], page.next_page_token

        return _paging.aiterate(fetch, limit)

    async def update(
        self,
        run_id: IdLike,
        *,
        labels: Mapping[str, str],
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncRun:
        """Replace the run's labels (the only field that can change)."""
        rid = _encode.request_id(request_id)
        return await self._mutate(
            self.transport.runs.Update, _requests.update_run(as_id(run_id), labels, rid), rid, timeout
        )

    async def cancel(
        self, run_id: IdLike, *, request_id: str | None = None, timeout: float | None = None
    ) -> AsyncRun:
        """Cancel a run: PENDING and TOOL_CALLS end CANCELLED at once, IN_PROGRESS goes CANCELLING."""
        rid = _encode.request_id(request_id)
        request = run_pb2.CancelRunRequest(run_id=as_id(run_id), request_id=rid)
        return await self._mutate(self.transport.runs.Cancel, request, rid, timeout)

    async def submit_tool_results(
        self,
        run_id: IdLike,
        results: ToolResultsSpec,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncRun:
        """Answer every pending tool call of a TOOL_CALLS run; the run is queued again."""
        rid = _encode.request_id(request_id)
        request = _requests.submit_tool_results(as_id(run_id), results, rid)
        return await self._mutate(self.transport.runs.SubmitToolResults, request, rid, timeout)

    async def wait(self, run_id: IdLike, *, timeout: float = 30.0) -> AsyncRun:
        """The server's long-poll; see ``Runs.wait``."""
        request = _requests.wait_run(as_id(run_id), timeout)
        stub = self.transport.runs
        run = await self.transport.unary(
            stub.Wait, request, run_pb2.Run, timeout=timeout + _requests.WAIT_MARGIN
        )
        return AsyncRun(self, run)

    def list_steps(
        self,
        run_id: IdLike,
        *,
        page_size: int | None = None,
        order: Order = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[RunStep]:
        """The run's steps, page by page as you ``async for`` over them."""

        async def fetch(token: str) -> _paging.Page[RunStep]:
            request = _requests.list_steps(as_id(run_id), page_size, order)
            request.page_token = token
            stub = self.transport.runs
            page = await self.transport.unary(
                stub.ListSteps, request, run_pb2.ListRunStepsResponse, timeout=timeout
            )
            return [_decode.run_step(s) for s in page.steps], page.next_page_token

        return _paging.aiterate(fetch, limit)

    def listen(
        self, run_id: IdLike, *, events_start_idx: int = 0, timeout: float | None = DEFAULT_WAIT
    ) -> AsyncIterator[RunEvent]:
        """The run's events until the terminal one, reconnecting by itself; see ``Run.listen``."""
        handle = AsyncRun(self, run_pb2.Run(id=as_id(run_id)))
        return handle.listen(events_start_idx=events_start_idx, timeout=timeout)

    # ---- helpers ----------------------------------------------------------------------------

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
        """Create a run and wait until it is finished or paused; returns the handle (check ``status``)."""
        deadline = Deadline(timeout)
        run = await self.create(
            thread_id=thread_id,
            assistant_id=assistant_id,
            request_id=request_id,
            timeout=deadline.cap(None),
            **options,
        )
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
        """Submit tool results and wait until the run is finished or paused again."""
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
        on_text: TextCallback | None = None,
        on_event: EventCallback | None = None,
        on_tool_calls: ToolCallsCallback | None = None,
        tools: Tools | None = None,
        declare_tools: bool = False,
        timeout: float | None = DEFAULT_WAIT,
        request_id: str | None = None,
        **overrides: Unpack[RunOverrides],
    ) -> RunResult:
        """Create a run and stream it with callbacks; see ``Runs.create_and_stream``."""
        deadline = Deadline(timeout)
        options = _requests.options_with_tools(overrides, tools, declare_tools)
        run = await self.create(
            thread_id=thread_id,
            assistant_id=assistant_id,
            request_id=request_id,
            timeout=deadline.cap(None),
            **options,
        )
        return await run.stream(
            on_text=on_text,
            on_event=on_event,
            on_tool_calls=on_tool_calls,
            tools=tools,
            timeout=deadline.remaining(),
        )

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
        """Create a run and see it to the end, answering its tool calls with ``tools`` concurrently."""
        deadline = Deadline(timeout)
        options = _requests.options_with_tools(overrides, tools, declare_tools)
        run = await self.create(
            thread_id=thread_id,
            assistant_id=assistant_id,
            request_id=request_id,
            timeout=deadline.cap(None),
            **options,
        )
        return await run.run_until_done(tools, timeout=deadline.remaining(), poll_interval=poll_interval)
