"""Accumulates one model turn: text, tool calls assembled from their deltas, usage, finish."""

from __future__ import annotations

from dataclasses import dataclass, field

from spindle.v1 import common_pb2, run_pb2
from spindle_server import ids
from spindle_server.engine import events
from spindle_server.models.base import Finish, ModelChunk, TextDelta, ToolCallDelta, UsageReport


@dataclass(slots=True)
class _CallBuilder:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class TurnState:
    text: list[str] = field(default_factory=list)
    calls: dict[int, _CallBuilder] = field(default_factory=dict)
    usage: common_pb2.Usage | None = None
    finish_reason: str = ""
    pending: list[run_pb2.StreamEvent] = field(default_factory=list)  # not yet written

    def add(self, chunk: ModelChunk) -> None:
        if isinstance(chunk, TextDelta):
            if not chunk.text:
                return
            self.text.append(chunk.text)
            last = self.pending[-1] if self.pending else None
            # Coalesce: consecutive deltas become one event.
            if last is not None and last.type == run_pb2.StreamEvent.PARTIAL_MESSAGE:
                last.message_delta.text += chunk.text
            else:
                self.pending.append(events.message_delta(chunk.text))
        elif isinstance(chunk, ToolCallDelta):
            builder = self.calls.setdefault(chunk.index, _CallBuilder())
            builder.id = builder.id or chunk.id
            builder.name = builder.name or chunk.name
            builder.arguments.append(chunk.arguments)
            last = self.pending[-1] if self.pending else None
            if (
                last is not None
                and last.type == run_pb2.StreamEvent.TOOL_CALL_DELTA
                and last.tool_call_delta.index == chunk.index
            ):
                last.tool_call_delta.id = last.tool_call_delta.id or chunk.id
                last.tool_call_delta.name = last.tool_call_delta.name or chunk.name
                last.tool_call_delta.arguments += chunk.arguments
            else:
                self.pending.append(
                    events.tool_call_delta(chunk.index, chunk.id, chunk.name, chunk.arguments)
                )
        elif isinstance(chunk, UsageReport):
            self.usage = common_pb2.Usage(
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
            )
        elif isinstance(chunk, Finish):
            self.finish_reason = chunk.reason

    def take_pending(self) -> list[run_pb2.StreamEvent]:
        pending, self.pending = self.pending, []
        return pending

    def tool_calls(self) -> list[common_pb2.ToolCall]:
        calls = []
        for index in sorted(self.calls):
            builder = self.calls[index]
            call = common_pb2.ToolCall(id=builder.id or ids.new_id("call"))
            call.function.name = builder.name
            call.function.arguments = "".join(builder.arguments)
            calls.append(call)
        return calls

    def turn_usage(self, estimated_prompt_tokens: int, count_tokens_of_text: int) -> common_pb2.Usage:
        if self.usage is not None:
            return self.usage
        # The provider reported none: fall back to our estimate.
        return common_pb2.Usage(
            prompt_tokens=estimated_prompt_tokens,
            completion_tokens=count_tokens_of_text,
            total_tokens=estimated_prompt_tokens + count_tokens_of_text,
        )
