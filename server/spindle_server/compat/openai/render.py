"""Spindle's protos as OpenAI objects, built and checked by the `openai` package's own types."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, timestamp_pb2

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server.compat.openai.sdk import BETA, checked
from spindle_server.store.base import TERMINAL_STATUSES

JSON = dict[str, Any]

RUN_STATUS = {
    run_pb2.PENDING: "queued",
    run_pb2.IN_PROGRESS: "in_progress",
    run_pb2.TOOL_CALLS: "requires_action",
    run_pb2.CANCELLING: "cancelling",
    run_pb2.CANCELLED: "cancelled",
    run_pb2.FAILED: "failed",
    run_pb2.COMPLETED: "completed",
    run_pb2.INCOMPLETE: "incomplete",
    run_pb2.EXPIRED: "expired",
}
STEP_STATUS = {
    run_pb2.RunStep.IN_PROGRESS: "in_progress",
    run_pb2.RunStep.CANCELLED: "cancelled",
    run_pb2.RunStep.FAILED: "failed",
    run_pb2.RunStep.COMPLETED: "completed",
    run_pb2.RunStep.EXPIRED: "expired",
}
# OpenAI's run error codes; Spindle's others (model_error, ...) are server_error there, and the
# message keeps Spindle's code so nothing is lost.
RUN_ERROR_CODES = ("server_error", "rate_limit_exceeded", "invalid_prompt")
# "max_tokens" is the provider's own output limit: OpenAI calls any output budget running out
# max_completion_tokens. "content_filter" has no OpenAI run reason and is passed through as is.
INCOMPLETE_REASONS = {"max_tokens": "max_completion_tokens"}


def seconds(stamp: timestamp_pb2.Timestamp, present: bool = True) -> int | None:
    return stamp.seconds if present and (stamp.seconds or stamp.nanos) else None


def _opt(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def tools(items: Any) -> list[JSON]:
    rendered = []
    for tool in items:
        function = tool.function
        body: JSON = {"name": function.name}
        if function.description:
            body["description"] = function.description
        if function.HasField("parameters"):
            body["parameters"] = json_format.MessageToDict(function.parameters)
        if function.strict:
            body["strict"] = True
        rendered.append({"type": "function", "function": body})
    return rendered


def response_format(value: common_pb2.ResponseFormat, present: bool) -> Any:
    if not present or value.type == common_pb2.ResponseFormat.TYPE_UNSPECIFIED:
        return "auto"
    if value.type == common_pb2.ResponseFormat.JSON_SCHEMA:
        schema = value.json_schema
        body: JSON = {"name": schema.name, "strict": schema.strict}
        if schema.description:
            body["description"] = schema.description
        if schema.HasField("schema"):
            body["schema"] = json_format.MessageToDict(schema.schema)
        return {"type": "json_schema", "json_schema": body}
    return {"type": common_pb2.ResponseFormat.Type.Name(value.type).lower()}


def tool_choice(choice: common_pb2.ToolChoice) -> Any:
    if choice.WhichOneof("choice") == "function_name":
        return {"type": "function", "function": {"name": choice.function_name}}
    mode = choice.mode or common_pb2.ToolChoice.AUTO
    return common_pb2.ToolChoice.Mode.Name(mode).lower()


def truncation(strategy: common_pb2.TruncationStrategy) -> JSON:
    if strategy.type == common_pb2.TruncationStrategy.LAST_MESSAGES:
        return {"type": "last_messages", "last_messages": strategy.last_messages}
    return {"type": "auto", "last_messages": None}


def usage(value: common_pb2.Usage) -> JSON:
    return {
        "prompt_tokens": value.prompt_tokens,
        "completion_tokens": value.completion_tokens,
        "total_tokens": value.total_tokens,
    }


def assistant(item: assistant_pb2.Assistant) -> JSON:
    options = item.completion_options
    body = {
        "id": item.id,
        "object": "assistant",
        "created_at": item.created_at.seconds,
        "name": item.name or None,
        "description": item.description or None,
        "model": item.model,
        "instructions": item.instructions or None,
        "tools": tools(item.tools),
        "metadata": dict(item.labels),
        "temperature": _opt(options, "temperature"),
        "top_p": _opt(options, "top_p"),
        "response_format": response_format(item.response_format, item.HasField("response_format")),
    }
    return checked(BETA, "Assistant", body)


def assistant_deleted(assistant_id: str) -> JSON:
    return checked(
        BETA, "AssistantDeleted", {"id": assistant_id, "object": "assistant.deleted", "deleted": True}
    )


def thread(item: thread_pb2.Thread) -> JSON:
    body = {
        "id": item.id,
        "object": "thread",
        "created_at": item.created_at.seconds,
        "metadata": dict(item.labels),
        "tool_resources": None,
    }
    return checked(BETA, "Thread", body)


def thread_deleted(thread_id: str) -> JSON:
    return checked(BETA, "ThreadDeleted", {"id": thread_id, "object": "thread.deleted", "deleted": True})


def text_content(text: str) -> JSON:
    return {"type": "text", "text": {"value": text, "annotations": []}}


def message(item: message_pb2.Message, status: str = "completed") -> JSON:
    body = {
        "id": item.id,
        "object": "thread.message",
        "created_at": item.created_at.seconds,
        "thread_id": item.thread_id,
        "role": "assistant" if item.role == message_pb2.ASSISTANT else "user",
        "content": [text_content(part.text.text) for part in item.content if part.HasField("text")],
        "assistant_id": item.assistant_id or None,
        "run_id": item.run_id or None,
        "attachments": [],
        "metadata": dict(item.labels),
        "status": status,
        "completed_at": item.created_at.seconds if status == "completed" and item.run_id else None,
        "incomplete_at": None,
        "incomplete_details": None,
    }
    return checked(f"{BETA}.threads", "Message", body)


def _run_error(error: common_pb2.Error) -> JSON:
    code = error.code if error.code in RUN_ERROR_CODES else "server_error"
    text = error.message if code == error.code else f"{error.code}: {error.message}"
    return {"code": code, "message": text}


def run(item: run_pb2.Run) -> JSON:
    status = RUN_STATUS.get(item.status, "queued")
    required = None
    if item.status == run_pb2.TOOL_CALLS:
        calls = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in item.required_tool_calls
        ]
        required = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": calls}}
    reason = item.incomplete_details.reason if item.HasField("incomplete_details") else ""
    body = {
        "id": item.id,
        "object": "thread.run",
        "created_at": item.created_at.seconds,
        "assistant_id": item.assistant_id,
        "thread_id": item.thread_id,
        "status": status,
        "started_at": seconds(item.started_at, item.HasField("started_at")),
        "expires_at": seconds(item.expires_at, item.HasField("expires_at")),
        "cancelled_at": seconds(item.cancelled_at, item.HasField("cancelled_at")),
        "failed_at": seconds(item.failed_at, item.HasField("failed_at")),
        "completed_at": seconds(item.completed_at, item.HasField("completed_at")),
        "required_action": required,
        "last_error": _run_error(item.last_error) if item.last_error.code else None,
        "incomplete_details": None,
        "model": item.model,
        "instructions": item.instructions,
        "tools": tools(item.tools),
        "metadata": dict(item.labels),
        "usage": usage(item.usage) if item.status in TERMINAL_STATUSES else None,
        "temperature": _opt(item, "temperature"),
        "top_p": _opt(item, "top_p"),
        "max_prompt_tokens": _opt(item, "max_prompt_tokens"),
        "max_completion_tokens": _opt(item, "max_completion_tokens"),
        "truncation_strategy": truncation(item.truncation_strategy),
        "response_format": response_format(item.response_format, item.HasField("response_format")),
        "tool_choice": tool_choice(item.tool_choice),
        "parallel_tool_calls": item.parallel_tool_calls,
    }
    rendered = checked(f"{BETA}.threads", "Run", body)
    if reason:
        # Set after the check: content_filter is a reason Spindle has and OpenAI's run type lacks.
        rendered["incomplete_details"] = {"reason": INCOMPLETE_REASONS.get(reason, reason)}
    return rendered


def step_details(item: run_pb2.RunStep, with_outputs: bool = True) -> JSON:
    if item.WhichOneof("details") == "tool_calls":
        calls = []
        for call in item.tool_calls.tool_calls:
            function: JSON = {"name": call.function.name, "arguments": call.function.arguments}
            function["output"] = call.output if with_outputs and call.output else None
            calls.append({"id": call.id, "type": "function", "function": function})
        return {"type": "tool_calls", "tool_calls": calls}
    return {"type": "message_creation", "message_creation": {"message_id": item.message_creation.message_id}}


def step(item: run_pb2.RunStep) -> JSON:
    kind = "tool_calls" if item.type == run_pb2.RunStep.TOOL_CALLS else "message_creation"
    finished = item.status != run_pb2.RunStep.IN_PROGRESS
    error = None
    if item.last_error.code:
        code = item.last_error.code if item.last_error.code == "rate_limit_exceeded" else "server_error"
        error = {"code": code, "message": item.last_error.message}
    body = {
        "id": item.id,
        "object": "thread.run.step",
        "created_at": item.created_at.seconds,
        "assistant_id": item.assistant_id,
        "thread_id": item.thread_id,
        "run_id": item.run_id,
        "type": kind,
        "status": STEP_STATUS.get(item.status, "in_progress"),
        "step_details": step_details(item),
        "last_error": error,
        "expired_at": seconds(item.expired_at, item.HasField("expired_at")),
        "cancelled_at": seconds(item.cancelled_at, item.HasField("cancelled_at")),
        "failed_at": seconds(item.failed_at, item.HasField("failed_at")),
        "completed_at": seconds(item.completed_at, item.HasField("completed_at")),
        "metadata": {},
        "usage": usage(item.usage) if finished and item.HasField("usage") else None,
    }
    return checked(f"{BETA}.threads.runs", "RunStep", body)


def page(data: list[JSON], has_more: bool) -> JSON:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
