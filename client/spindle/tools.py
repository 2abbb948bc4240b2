"""Answer a run's tool calls with Python functions: ``tools={"get_weather": get_weather}``.

Each call's JSON arguments become keyword arguments; the return value is sent as the output
(strings as they are, anything else as JSON). Several calls of one pause run concurrently:
in threads for the sync client, with ``asyncio.gather`` for the async one (plain functions go
to ``asyncio.to_thread``, coroutine functions are awaited).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def _call_sync(tools: ToolFunctions, call: ToolCall, run: RunHandle | None) -> ToolResult:
    fn = _function_for(tools, call, run)
    arguments = _keyword_arguments(call, run)
    try:
        value = fn(**arguments)
    except Exception as exc:
        raise _failed(call, run, exc) from exc
    return ToolResult(call.id, output_text(value))


def run_tool_calls(
    tools: ToolFunctions, calls: Sequence[ToolCall], run: RunHandle | None = None
) -> list[ToolResult]:
    """Answer every call, concurrently in threads when there are several; results in call order.

    Raises ToolExecutionError (with ``run`` and the ``tool_call``) if a function is missing or raises.
    """
    if len(calls) <= 1:
        return [_call_sync(tools, call, run) for call in calls]
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="spindle-tool") as pool:
        futures = [pool.submit(_call_sync, tools, call, run) for call in calls]
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
    """Async twin of :func:`run_tool_calls`: all calls at once with ``asyncio.gather``."""
    return list(await asyncio.gather(*(_call_async(tools, call, run) for call in calls)))
