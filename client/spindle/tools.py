"""Answer a run's tool calls with Python functions: ``tools={"get_weather": get_weather}``.

Each call's JSON arguments become keyword arguments; the return value is sent as the output
(strings as they are, anything else as JSON). Several calls of one pause run concurrently:
in threads for the sync client, with ``asyncio.gather`` for the async one (plain functions go
to ``asyncio.to_thread``, coroutine functions are awaited). Both twins take plain and
``async def`` functions (the sync one runs a coroutine to its end with ``asyncio.run``), give
every function the caller's ``contextvars``, and let every call of a pause finish before they
raise the first failure (in call order). A function that keeps thread-bound state (an sqlite3
connection, a thread-local) must expect to be called from a worker thread when the model asks
for several calls at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, TypeAlias

from spindle._encode import output_text
from spindle._schema import describe_function
from spindle.errors import ToolExecutionError
from spindle.types import FunctionTool, ToolCall, ToolResult

__all__ = [
    "ToolFunctions",
    "Tools",
    "as_tool_functions",
    "describe_function",
    "run_tool_calls",
    "run_tool_calls_async",
    "tool_specs",
]

if TYPE_CHECKING:
    from spindle.async_run import AsyncRun
    from spindle.run import Run

    RunHandle: TypeAlias = Run | AsyncRun

ToolFunctions: TypeAlias = Mapping[str, Callable[..., Any]]
"""Tool name -> the function that answers it (plain or ``async def``)."""

Tools: TypeAlias = ToolFunctions | Sequence[Callable[..., Any]]
"""A ToolFunctions mapping, or a list of functions named by their ``__name__``."""

MAX_TOOL_THREADS = 32
"""At most this many calls of one pause run at the same time (sync client)."""


def as_tool_functions(tools: Tools) -> ToolFunctions:
    """The mapping a ``tools=`` argument stands for."""
    if isinstance(tools, Mapping):
        return tools
    return {fn.__name__: fn for fn in tools}


def tool_specs(tools: ToolFunctions) -> list[FunctionTool]:
    """FunctionTools describing the functions (named by their keys), to declare on an assistant or run."""
    specs = []
    for name, fn in tools.items():
        described = describe_function(fn)
        specs.append(FunctionTool(name, described.description, described.parameters))
    return specs


def _function_for(tools: ToolFunctions, call: ToolCall, run: RunHandle | None) -> Callable[..., Any]:
    fn = tools.get(call.name)
    if fn is None:
        raise ToolExecutionError(
            f"the model called {call.name!r}, but no function was given for it", run, call
        )
    return fn


def _keyword_arguments(call: ToolCall, run: RunHandle | None) -> dict[str, Any]:
    try:
        arguments = call.parse_arguments()
    except ValueError as exc:
        raise ToolExecutionError(f"the arguments of {call.name!r} are not JSON: {exc}", run, call) from exc
    if not isinstance(arguments, dict):
        raise ToolExecutionError(f"the arguments of {call.name!r} are not a JSON object", run, call)
    return arguments


def _failed(call: ToolCall, run: RunHandle | None, exc: BaseException) -> ToolExecutionError:
    error = ToolExecutionError(f"tool {call.name!r} (call {call.id}) raised {exc!r}", run, call)
    error.__cause__ = exc
    return error


async def _result_of(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _run_to_result(awaitable: Awaitable[Any]) -> Any:
    """What an ``async def`` tool returns, run on an event loop of its own: in this thread, or in
    a helper thread when this one already runs a loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_result_of(awaitable))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spindle-tool-loop") as helper:
        context = contextvars.copy_context()
        return helper.submit(context.run, asyncio.run, _result_of(awaitable)).result()


def _call_sync(tools: ToolFunctions, call: ToolCall, run: RunHandle | None) -> ToolResult:
    fn = _function_for(tools, call, run)
    arguments = _keyword_arguments(call, run)
    try:
        value = fn(**arguments)
        if inspect.isawaitable(value):  # an ``async def`` tool: run it to its result
            value = _run_to_result(value)
    except Exception as exc:
        raise _failed(call, run, exc) from exc
    return ToolResult(call.id, output_text(value))


def run_tool_calls(
    tools: ToolFunctions, calls: Sequence[ToolCall], run: RunHandle | None = None
) -> list[ToolResult]:
    """Answer every call, concurrently in threads when there are several; results in call order.

    Each worker thread runs with a copy of the caller's ``contextvars``. Raises
    ToolExecutionError (with ``run`` and the ``tool_call``) if a function is missing or raises,
    once every call has finished.
    """
    if len(calls) <= 1:
        return [_call_sync(tools, call, run) for call in calls]
    with ThreadPoolExecutor(
        max_workers=min(len(calls), MAX_TOOL_THREADS), thread_name_prefix="spindle-tool"
    ) as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, _call_sync, tools, call, run) for call in calls
        ]
        wait(futures)
    return [future.result() for future in futures]


async def _call_async(tools: ToolFunctions, call: ToolCall, run: RunHandle | None) -> ToolResult:
    fn = _function_for(tools, call, run)
    arguments = _keyword_arguments(call, run)
    try:
        if inspect.iscoroutinefunction(fn):
            value = await fn(**arguments)
        else:
            value = await asyncio.to_thread(fn, **arguments)
            if inspect.isawaitable(value):
                value = await value
    except Exception as exc:
        raise _failed(call, run, exc) from exc
    return ToolResult(call.id, output_text(value))


async def run_tool_calls_async(
    tools: ToolFunctions, calls: Sequence[ToolCall], run: RunHandle | None = None
) -> list[ToolResult]:
    """Async twin of :func:`run_tool_calls`: all calls at once with ``asyncio.gather``; a failure
    is raised once every call has finished (none is left running behind the caller's back)."""
    outcomes = await asyncio.gather(
        *(_call_async(tools, call, run) for call in calls), return_exceptions=True
    )
    results: list[ToolResult] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results
