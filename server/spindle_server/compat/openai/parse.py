"""OpenAI request bodies as Spindle's gRPC requests.

Only the shape is checked here (types, OpenAI's enums, what Spindle cannot do); every limit and
rule is left to the servicer's own validation, so it is the same for both APIs. Anything Spindle
does not support is refused with code `unsupported`, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import struct_pb2

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server.api.errors import ApiError, invalid_argument

JSON = Mapping[str, Any]

UNSUPPORTED_TOOLS = ("file_search", "code_interpreter")


def unsupported(param: str, what: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNSUPPORTED",
        f"{what} is not supported by Spindle",
        violations=[(param, f"{what} is not supported")],
    )


def bad(param: str, description: str) -> ApiError:
    return invalid_argument([(param, description)])


class Body:
    """A JSON object with typed getters; unknown keys are refused, as OpenAI does."""

    def __init__(self, data: Any, known: tuple[str, ...], where: str = "") -> None:
        if not isinstance(data, dict):
            raise bad(where.rstrip(".") or "body", "must be a JSON object")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise bad(f"{where}{unknown[0]}", "is not a recognized argument")
        self.data: dict[str, Any] = data
        self.where = where

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _get(self, key: str, kinds: type | tuple[type, ...], label: str) -> Any:
        value = self.data.get(key)
        if value is None:
            return None
        # bool is an int in Python; JSON true is never a number.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
            raise bad(self.where + key, f"must be {label}")
        return value

    def text(self, key: str) -> str | None:
        value: str | None = self._get(key, str, "a string")
        return value

    def integer(self, key: str) -> int | None:
        value: int | None = self._get(key, int, "an integer")
        return value

    def number(self, key: str) -> float | None:
        value = self._get(key, (int, float), "a number")
        return None if value is None else float(value)

    def flag(self, key: str) -> bool | None:
        value: bool | None = self._get(key, bool, "a boolean")
        return value

    def array(self, key: str) -> list[Any] | None:
        value: list[Any] | None = self._get(key, list, "an array")
        return value

    def metadata(self) -> dict[str, str] | None:
        value = self._get("metadata", dict, "an object of strings")
        if value is None:
            return None
        for name, item in value.items():
            if not isinstance(item, str):
                raise bad(f"{self.where}metadata.{name}", "must be a string")
        return dict(value)

    def no_tool_resources(self) -> None:
        if self.data.get("tool_resources"):
            raise unsupported(self.where + "tool_resources", "tool_resources (files, vector stores)")


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _struct(param: str, value: Any) -> struct_pb2.Struct:
    if not isinstance(value, dict):
        raise bad(param, "must be a JSON object")
    result = struct_pb2.Struct()
    try:
        result.update(value)
    except (ValueError, TypeError, RecursionError) as exc:
        raise bad(param, f"is not a JSON object Spindle can hold: {type(exc).__name__}") from exc
    return result


def tools(param: str, items: list[Any]) -> list[common_pb2.Tool]:
    result = []
    for index, item in enumerate(items):
        where = f"{param}[{index}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in UNSUPPORTED_TOOLS:
            raise unsupported(f"{where}.type", f"the {kind} tool")
        if kind != "function":
            raise bad(f"{where}.type", "must be 'function'")
        body = Body(item, ("type", "function"), f"{where}.")
        function = Body(
            body.data.get("function"), ("name", "description", "parameters", "strict"), f"{where}.function."
        )
        tool = common_pb2.Tool()
        tool.function.name = function.text("name") or ""
        tool.function.description = function.text("description") or ""
        tool.function.strict = bool(function.flag("strict"))
        if function.has("parameters"):
            tool.function.parameters.CopyFrom(
                _struct(f"{where}.function.parameters", function.data["parameters"])
            )
        result.append(tool)
    return result


def response_format(param: str, value: Any) -> common_pb2.ResponseFormat | None:
    if value is None or value == "auto":
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    result = common_pb2.ResponseFormat()
    if kind == "text":
        result.type = common_pb2.ResponseFormat.TEXT
    elif kind == "json_object":
        result.type = common_pb2.ResponseFormat.JSON_OBJECT
    elif kind == "json_schema":
        result.type = common_pb2.ResponseFormat.JSON_SCHEMA
        schema = Body(
            value.get("json_schema"), ("name", "description", "schema", "strict"), f"{param}.json_schema."
        )
        result.json_schema.name = schema.text("name") or ""
        result.json_schema.description = schema.text("description") or ""
        result.json_schema.strict = bool(schema.flag("strict"))
        if schema.has("schema"):
            result.json_schema.schema.CopyFrom(_struct(f"{param}.json_schema.schema", schema.data["schema"]))
    else:
        raise bad(param, "must be 'auto' or an object with type text, json_object or json_schema")
    return result


def tool_choice(value: Any) -> common_pb2.ToolChoice | None:
    if value is None:
        return None
    modes = {"auto": common_pb2.ToolChoice.AUTO, "none": common_pb2.ToolChoice.NONE}
    modes["required"] = common_pb2.ToolChoice.REQUIRED
    if isinstance(value, str) and value in modes:
        return common_pb2.ToolChoice(mode=modes[value])
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in UNSUPPORTED_TOOLS:
            raise unsupported("tool_choice.type", f"the {kind} tool")
        function = value.get("function")
        if kind == "function" and isinstance(function, dict) and isinstance(function.get("name"), str):
            return common_pb2.ToolChoice(function_name=function["name"])
    raise bad("tool_choice", "must be auto, none, required or {type: function, function: {name}}")


def truncation(value: Any) -> common_pb2.TruncationStrategy | None:
    if value is None:
        return None
    body = Body(value, ("type", "last_messages"), "truncation_strategy.")
    kind = body.text("type")
    if kind == "auto":
        return common_pb2.TruncationStrategy(type=common_pb2.TruncationStrategy.AUTO)
    if kind == "last_messages":
        return common_pb2.TruncationStrategy(
            type=common_pb2.TruncationStrategy.LAST_MESSAGES, last_messages=body.integer("last_messages") or 0
        )
    raise bad("truncation_strategy.type", "must be auto or last_messages")


def role(param: str, value: Any) -> message_pb2.MessageRole.ValueType:
    if value == "user":
        return message_pb2.USER
    if value == "assistant":
        return message_pb2.ASSISTANT
    raise bad(param, "must be user or assistant")


def content(param: str, value: Any) -> list[message_pb2.ContentPart]:
    """A string, or an array of parts of which Spindle takes text."""
    if isinstance(value, str):
        return [message_pb2.ContentPart(text=message_pb2.TextPart(text=value))]
    if not isinstance(value, list):
        raise bad(param, "must be a string or an array of content parts")
    parts = []
    for index, item in enumerate(value):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("image_file", "image_url"):
            raise unsupported(f"{param}[{index}].type", f"{kind} content")
        if kind != "text" or not isinstance(item.get("text"), str):
            raise bad(f"{param}[{index}]", "must be {type: text, text: string}")
        parts.append(message_pb2.ContentPart(text=message_pb2.TextPart(text=item["text"])))
    return parts


MESSAGE_KEYS = ("role", "content", "attachments", "metadata")


def message_input(param: str, value: Any) -> message_pb2.MessageInput:
    body = Body(value, MESSAGE_KEYS, f"{param}.")
    if body.data.get("attachments"):
        raise unsupported(f"{param}.attachments", "attachments (files)")
    return message_pb2.MessageInput(
        role=role(f"{param}.role", body.data.get("role")),
        content=content(f"{param}.content", body.data.get("content")),
        labels=body.metadata() or {},
    )


def message_inputs(param: str, value: list[Any] | None) -> list[message_pb2.MessageInput]:
    return [message_input(f"{param}[{index}]", item) for index, item in enumerate(value or [])]


def create_message(thread_id: str, data: Any, request_id: str) -> message_pb2.CreateMessageRequest:
    item = message_input("", data)
    return message_pb2.CreateMessageRequest(
        thread_id=thread_id, role=item.role, content=item.content, labels=item.labels, request_id=request_id
    )


ASSISTANT_KEYS = (
    "model",
    "name",
    "description",
    "instructions",
    "tools",
    "metadata",
    "temperature",
    "top_p",
    "response_format",
    "tool_resources",
    "reasoning_effort",
)


def _assistant_fields(body: Body, request: Any) -> list[str]:
    """Copies the given fields onto a Create/UpdateAssistantRequest; returns the mask paths."""
    body.no_tool_resources()
    if body.has("reasoning_effort"):
        raise unsupported("reasoning_effort", "reasoning_effort")
    paths = []
    for key in ("model", "name", "description", "instructions"):
        value = body.text(key)
        if value is not None:
            setattr(request, key, value)
            paths.append(key)
    if body.has("tools"):
        request.tools.extend(tools("tools", body.array("tools") or []))
        paths.append("tools")
    metadata = body.metadata()
    if metadata is not None:
        request.labels.update(metadata)
        paths.append("labels")
    temperature, top_p = body.number("temperature"), body.number("top_p")
    if temperature is not None or top_p is not None:
        if temperature is not None:
            request.completion_options.temperature = temperature
        if top_p is not None:
            request.completion_options.top_p = top_p
        paths.append("completion_options")
    if "response_format" in body.data:
        rendered = response_format("response_format", body.data["response_format"])
        if rendered is not None:
            request.response_format.CopyFrom(rendered)
        paths.append("response_format")
    return paths


def create_assistant(data: Any, request_id: str) -> assistant_pb2.CreateAssistantRequest:
    body = Body(data, ASSISTANT_KEYS)
    request = assistant_pb2.CreateAssistantRequest(request_id=request_id)
    _assistant_fields(body, request)
    return request


def update_assistant(assistant_id: str, data: Any, request_id: str) -> assistant_pb2.UpdateAssistantRequest:
    body = Body(data, ASSISTANT_KEYS)
    request = assistant_pb2.UpdateAssistantRequest(assistant_id=assistant_id, request_id=request_id)
    request.update_mask.paths.extend(_assistant_fields(body, request))
    return request


THREAD_KEYS = ("messages", "metadata", "tool_resources")


def create_thread(data: Any, request_id: str) -> thread_pb2.CreateThreadRequest:
    body = Body(data if data is not None else {}, THREAD_KEYS)
    body.no_tool_resources()
    return thread_pb2.CreateThreadRequest(
        messages=message_inputs("messages", body.array("messages")),
        labels=body.metadata() or {},
        request_id=request_id,
    )


def update_thread(thread_id: str, data: Any, request_id: str) -> thread_pb2.UpdateThreadRequest:
    body = Body(data, ("metadata", "tool_resources"))
    body.no_tool_resources()
    request = thread_pb2.UpdateThreadRequest(thread_id=thread_id, request_id=request_id)
    metadata = body.metadata()
    if metadata is not None:
        request.labels.update(metadata)
        request.update_mask.paths.append("labels")
    return request


RUN_KEYS = (
    "assistant_id",
    "model",
    "instructions",
    "additional_instructions",
    "additional_messages",
    "tools",
    "metadata",
    "temperature",
    "top_p",
    "stream",
    "max_prompt_tokens",
    "max_completion_tokens",
    "truncation_strategy",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
)


def create_run(
    thread_id: str, data: Any, request_id: str, extra: tuple[str, ...] = ()
) -> tuple[run_pb2.CreateRunRequest, Body]:
    body = Body(data, RUN_KEYS + extra)
    if body.has("reasoning_effort"):
        raise unsupported("reasoning_effort", "reasoning_effort")
    request = run_pb2.CreateRunRequest(
        thread_id=thread_id,
        assistant_id=body.text("assistant_id") or "",
        additional_instructions=body.text("additional_instructions") or "",
        additional_messages=message_inputs("additional_messages", body.array("additional_messages")),
        labels=body.metadata() or {},
        request_id=request_id,
    )
    for key in ("model", "instructions"):
        value = body.text(key)
        if value is not None:
            setattr(request, key, value)
    if body.has("tools"):
        request.tools.extend(tools("tools", body.array("tools") or []))
        request.override_tools = True
    for key in ("temperature", "top_p"):
        number = body.number(key)
        if number is not None:
            setattr(request, key, number)
    for key in ("max_prompt_tokens", "max_completion_tokens"):
        count = body.integer(key)
        if count is not None:
            setattr(request, key, count)
    parallel = body.flag("parallel_tool_calls")
    if parallel is not None:
        request.parallel_tool_calls = parallel
    choice = tool_choice(body.data.get("tool_choice"))
    if choice is not None:
        request.tool_choice.CopyFrom(choice)
    strategy = truncation(body.data.get("truncation_strategy"))
    if strategy is not None:
        request.truncation_strategy.CopyFrom(strategy)
    rendered = response_format("response_format", body.data.get("response_format"))
    if rendered is not None:
        request.response_format.CopyFrom(rendered)
    body.flag("stream")
    return request, body


def update_run(run_id: str, data: Any, request_id: str) -> run_pb2.UpdateRunRequest:
    body = Body(data, ("metadata",))
    request = run_pb2.UpdateRunRequest(run_id=run_id, request_id=request_id)
    request.labels.update(body.metadata() or {})
    request.update_mask.paths.append("labels")
    return request


def submit_tool_outputs(
    run_id: str, data: Any, request_id: str
) -> tuple[run_pb2.SubmitToolResultsRequest, bool]:
    body = Body(data, ("tool_outputs", "stream"))
    request = run_pb2.SubmitToolResultsRequest(run_id=run_id, request_id=request_id)
    for index, item in enumerate(body.array("tool_outputs") or []):
        output = Body(item, ("tool_call_id", "output"), f"tool_outputs[{index}].")
        request.tool_results.add(
            tool_call_id=output.text("tool_call_id") or "", output=output.text("output") or ""
        )
    return request, bool(body.flag("stream"))
