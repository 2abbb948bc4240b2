"""Builders for the StreamEvents of a run's log, and the rule for which one is terminal."""

from __future__ import annotations

from collections.abc import Iterable

from spindle.v1 import common_pb2, message_pb2, run_pb2
from spindle_server.store.base import TERMINAL_STATUSES


def status_change(
    run: run_pb2.Run, reason: str = "", *, discard_partial: bool = False
) -> run_pb2.StreamEvent:
    event = run_pb2.StreamEvent(type=run_pb2.StreamEvent.STATUS, status=run.status)
    event.status_change.run.CopyFrom(run)
    event.status_change.reason = reason
    event.status_change.discard_partial_message = discard_partial
    return event


def message_delta(text: str) -> run_pb2.StreamEvent:
    event = run_pb2.StreamEvent(type=run_pb2.StreamEvent.PARTIAL_MESSAGE, status=run_pb2.IN_PROGRESS)
    event.message_delta.text = text
    return event


def tool_call_delta(index: int, call_id: str, name: str, arguments: str) -> run_pb2.StreamEvent:
    event = run_pb2.StreamEvent(type=run_pb2.StreamEvent.TOOL_CALL_DELTA, status=run_pb2.IN_PROGRESS)
    event.tool_call_delta.index = index
    event.tool_call_delta.id = call_id
    event.tool_call_delta.name = name
    event.tool_call_delta.arguments = arguments
    return event


def usage(turn_usage: common_pb2.Usage) -> run_pb2.StreamEvent:
    event = run_pb2.StreamEvent(type=run_pb2.StreamEvent.USAGE, status=run_pb2.IN_PROGRESS)
    event.usage.CopyFrom(turn_usage)
    return event


def tool_calls(calls: Iterable[common_pb2.ToolCall]) -> run_pb2.StreamEvent:
    event = run_pb2.StreamEvent(type=run_pb2.StreamEvent.TOOL_CALLS, status=run_pb2.TOOL_CALLS)
    event.tool_calls.tool_calls.extend(calls)
    return event


def done(message: message_pb2.Message, total: common_pb2.Usage) -> run_pb2.StreamEvent:
    event = run_pb2.StreamEvent(type=run_pb2.StreamEvent.DONE, status=run_pb2.COMPLETED)
    event.done.message.CopyFrom(message)
    event.done.usage.CopyFrom(total)
    return event


def error(code: str, message: str) -> run_pb2.StreamEvent:
    event = run_pb2.StreamEvent(type=run_pb2.StreamEvent.ERROR, status=run_pb2.FAILED)
    event.error.code = code
    event.error.message = message
    return event


def is_terminal(event: run_pb2.StreamEvent) -> bool:
    if event.type in (run_pb2.StreamEvent.DONE, run_pb2.StreamEvent.ERROR):
        return True
    return event.type == run_pb2.StreamEvent.STATUS and event.status in TERMINAL_STATUSES
