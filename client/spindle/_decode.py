"""Protos -> the plain objects of ``spindle.types`` (pure functions, shared by sync and async)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from spindle.enums import MessageRole, RunStatus
from spindle.types import (
    Assistant,
    FunctionTool,
    Message,
    ResponseFormat,
    RunData,
    RunError,
    RunStep,
    Thread,
    ToolCall,
    TruncationStrategy,
    Usage,
)
from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2

_STEP_TYPES: dict[int, Literal["message_creation", "tool_calls", "unspecified"]] = {
    run_pb2.RunStep.MESSAGE_CREATION: "message_creation",
    run_pb2.RunStep.TOOL_CALLS: "tool_calls",
}
_STEP_STATUSES: dict[
    int, Literal["in_progress", "cancelled", "failed", "completed", "expired", "unspecified"]
] = {
    run_pb2.RunStep.IN_PROGRESS: "in_progress",
    run_pb2.RunStep.CANCELLED: "cancelled",
    run_pb2.RunStep.FAILED: "failed",
    run_pb2.RunStep.COMPLETED: "completed",
    run_pb2.RunStep.EXPIRED: "expired",
}
_RESPONSE_TYPES: dict[int, Literal["text", "json_object", "json_schema"]] = {
    common_pb2.ResponseFormat.JSON_OBJECT: "json_object",
    common_pb2.ResponseFormat.JSON_SCHEMA: "json_schema",
}
_TOOL_CHOICE_MODES = {
    common_pb2.ToolChoice.NONE: "none",
    common_pb2.ToolChoice.REQUIRED: "required",
}


def timestamp(value: timestamp_pb2.Timestamp) -> datetime | None:
    """An aware UTC datetime, or None for an unset timestamp."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=UTC)


def struct(value: struct_pb2.Struct, present: bool = True) -> dict[str, Any] | None:
    return json_format.MessageToDict(value) if present else None


def usage(value: common_pb2.Usage) -> Usage:
    return Usage(value.prompt_tokens, value.completion_tokens, value.total_tokens)


def error(value: common_pb2.Error) -> RunError:
    return RunError(value.code, value.message)


def tool_call(value: common_pb2.ToolCall, *, with_output: bool = False) -> ToolCall:
    return ToolCall(
        id=value.id,
        name=value.function.name,
        arguments=value.function.arguments,
        output=value.output if with_output else None,
    )


def function_tool(value: common_pb2.Tool) -> FunctionTool:
    function = value.function
    return FunctionTool(
        name=function.name,
        description=function.description,
        parameters=struct(function.parameters, function.HasField("parameters")),
        strict=function.strict,
    )


def truncation(value: common_pb2.TruncationStrategy, present: bool = True) -> TruncationStrategy | None:
    if not present:
        return None
    if value.type == common_pb2.TruncationStrategy.LAST_MESSAGES:
        return TruncationStrategy("last_messages", value.last_messages)
    return TruncationStrategy("auto")


def response_format(value: common_pb2.ResponseFormat, present: bool = True) -> ResponseFormat | None:
    if not present:
        return None
    schema = value.json_schema
    return ResponseFormat(
        type=_RESPONSE_TYPES.get(value.type, "text"),
        name=schema.name,
        description=schema.description,
        schema=struct(schema.schema, schema.HasField("schema")),
        strict=schema.strict,
    )


def tool_choice(value: common_pb2.ToolChoice) -> str:
    if value.WhichOneof("choice") == "function_name":
        return value.function_name
    return _TOOL_CHOICE_MODES.get(value.mode, "auto")


def message(value: message_pb2.Message) -> Message:
    return Message(
        id=value.id,
        thread_id=value.thread_id,
        role=MessageRole(value.role),
        parts=tuple(part.text.text for part in value.content if part.WhichOneof("part") == "text"),
        run_id=value.run_id,
        assistant_id=value.assistant_id,
        labels=dict(value.labels),
        created_at=timestamp(value.created_at),
        created_by=value.created_by,
    )


def assistant(value: assistant_pb2.Assistant) -> Assistant:
    options = value.completion_options
    prompt = value.prompt_truncation_options
    return Assistant(
        id=value.id,
        name=value.name,
        description=value.description,
        model=value.model,
        instructions=value.instructions,
        tools=tuple(function_tool(t) for t in value.tools),
        temperature=options.temperature if options.HasField("temperature") else None,
        top_p=options.top_p if options.HasField("top_p") else None,
        max_tokens=options.max_tokens if options.HasField("max_tokens") else None,
        max_prompt_tokens=prompt.max_prompt_tokens if prompt.HasField("max_prompt_tokens") else None,
        truncation_strategy=truncation(prompt.truncation_strategy, prompt.HasField("truncation_strategy")),
        response_format=response_format(value.response_format, value.HasField("response_format")),
        labels=dict(value.labels),
        created_at=timestamp(value.created_at),
        updated_at=timestamp(value.updated_at),
        created_by=value.created_by,
    )


def thread(value: thread_pb2.Thread) -> Thread:
    return Thread(
        id=value.id,
        name=value.name,
        description=value.description,
        labels=dict(value.labels),
        created_at=timestamp(value.created_at),
        updated_at=timestamp(value.updated_at),
        created_by=value.created_by,
    )


def run_step(value: run_pb2.RunStep) -> RunStep:
    return RunStep(
        id=value.id,
        run_id=value.run_id,
        thread_id=value.thread_id,
        assistant_id=value.assistant_id,
        type=_STEP_TYPES.get(value.type, "unspecified"),
        status=_STEP_STATUSES.get(value.status, "unspecified"),
        message_id=value.message_creation.message_id,
        tool_calls=tuple(tool_call(c, with_output=True) for c in value.tool_calls.tool_calls),
        last_error=error(value.last_error) if value.HasField("last_error") else None,
        usage=usage(value.usage) if value.HasField("usage") else None,
        created_at=timestamp(value.created_at),
        completed_at=timestamp(value.completed_at),
        cancelled_at=timestamp(value.cancelled_at),
        failed_at=timestamp(value.failed_at),
        expired_at=timestamp(value.expired_at),
    )


def run_data(value: run_pb2.Run) -> RunData:
    return RunData(
        id=value.id,
        assistant_id=value.assistant_id,
        thread_id=value.thread_id,
        created_by=value.created_by,
        status=RunStatus(value.status),
        labels=dict(value.labels),
        created_at=timestamp(value.created_at),
        started_at=timestamp(value.started_at),
        completed_at=timestamp(value.completed_at),
        cancelled_at=timestamp(value.cancelled_at),
        failed_at=timestamp(value.failed_at),
        expires_at=timestamp(value.expires_at),
        updated_at=timestamp(value.updated_at),
        last_error=error(value.last_error) if value.HasField("last_error") else None,
        incomplete_reason=value.incomplete_details.reason if value.HasField("incomplete_details") else None,
        required_tool_calls=tuple(tool_call(c) for c in value.required_tool_calls),
        usage=usage(value.usage) if value.HasField("usage") else None,
        model=value.model,
        instructions=value.instructions,
        additional_instructions=value.additional_instructions,
        tools=tuple(function_tool(t) for t in value.tools),
        tool_choice=tool_choice(value.tool_choice),
        parallel_tool_calls=value.parallel_tool_calls,
        temperature=value.temperature if value.HasField("temperature") else None,
        top_p=value.top_p if value.HasField("top_p") else None,
        max_prompt_tokens=value.max_prompt_tokens if value.HasField("max_prompt_tokens") else None,
        max_completion_tokens=value.max_completion_tokens
        if value.HasField("max_completion_tokens")
        else None,
        truncation_strategy=truncation(value.truncation_strategy, value.HasField("truncation_strategy")),
        response_format=response_format(value.response_format, value.HasField("response_format")),
        reply=message(value.reply) if value.HasField("reply") else None,
        attempt=value.attempt,
    )
