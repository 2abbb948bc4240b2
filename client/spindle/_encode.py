"""Python arguments -> request protos (pure functions, shared by sync and async).

Accepted shapes are the friendly ones of the public surface: tools as ``FunctionTool``, Python
functions or OpenAI-style dicts; messages as strings or dicts; ``"asc"``/``"desc"`` orders; and
so on. Every mutation gets a ``request_id``: the caller's, or a fresh one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

from google.protobuf import json_format, struct_pb2

from spindle._schema import describe_function
from spindle.enums import MessageRole, SortOrder
from spindle.types import FunctionTool, ResponseFormat, ToolResult, TruncationStrategy
from spindle.v1 import common_pb2, message_pb2

ToolSpec: TypeAlias = FunctionTool | Callable[..., Any] | Mapping[str, Any]
"""A tool: a FunctionTool, a Python function (described from its signature), or a dict
(``{"name", "description", "parameters"}``, or OpenAI's ``{"type": "function", "function": {...}}``)."""

MessageSpec: TypeAlias = str | Mapping[str, Any]
"""A message: its text, or ``{"text": ..., "role": "user"|"assistant", "labels": {...}}``."""

ToolResultsSpec: TypeAlias = Mapping[str, Any] | Iterable[ToolResult | Mapping[str, Any]]
"""Tool results: ``{tool_call_id: output}``, or items ``{"tool_call_id": ..., "output": ...}``.
Outputs that are not strings are sent as JSON."""

Order: TypeAlias = Literal["asc", "desc"] | SortOrder | None

_TOOL_CHOICE_MODES = {
    "auto": common_pb2.ToolChoice.AUTO,
    "none": common_pb2.ToolChoice.NONE,
    "required": common_pb2.ToolChoice.REQUIRED,
}
_FORMAT_NAMES: tuple[Literal["text", "json_object", "json_schema"], ...] = (
    "text",
    "json_object",
    "json_schema",
)
_RESPONSE_TYPES = {
    "text": common_pb2.ResponseFormat.TEXT,
    "json_object": common_pb2.ResponseFormat.JSON_OBJECT,
    "json_schema": common_pb2.ResponseFormat.JSON_SCHEMA,
}


def request_id(given: str | None) -> str:
    """The caller's request_id, or a new random one: the same value is used for every retry."""
    return given if given else uuid.uuid4().hex


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    json_format.ParseDict(dict(value), result)
    return result


def tool(spec: ToolSpec) -> common_pb2.Tool:
    function = _function_tool(spec)
    result = common_pb2.Tool()
    result.function.name = function.name
    result.function.description = function.description
    result.function.strict = function.strict
    if function.parameters is not None:
        result.function.parameters.CopyFrom(struct(function.parameters))
    return result


def tools(specs: Iterable[ToolSpec]) -> list[common_pb2.Tool]:
    return [tool(spec) for spec in specs]


def _function_tool(spec: ToolSpec) -> FunctionTool:
    if isinstance(spec, FunctionTool):
        return spec
    if isinstance(spec, Mapping):
        body: Mapping[str, Any] = spec.get("function", spec) if spec.get("type") == "function" else spec
        return FunctionTool(
            name=str(body["name"]),
            description=str(body.get("description", "")),
            parameters=body.get("parameters"),
            strict=bool(body.get("strict", False)),
        )
    if callable(spec):
        return describe_function(spec)
    raise TypeError(f"not a tool: {spec!r}")


def role(value: MessageRole | str) -> message_pb2.MessageRole.ValueType:
    number = int(value) if isinstance(value, MessageRole) else int(MessageRole[value.upper()])
    return message_pb2.MessageRole.ValueType(number)


def message_input(spec: MessageSpec) -> message_pb2.MessageInput:
    if isinstance(spec, str):
        return message_pb2.MessageInput(role=message_pb2.USER, text=spec)
    result = message_pb2.MessageInput(role=role(spec.get("role", MessageRole.USER)))
    content = spec.get("content", spec.get("text", ""))
    if isinstance(content, str):
        result.text = content
    else:
        for part in content:
            result.content.add().text.text = part if isinstance(part, str) else str(part["text"])
    result.labels.update(spec.get("labels", {}))
    return result


def tool_choice(value: str) -> common_pb2.ToolChoice:
    """``"auto"``, ``"none"``, ``"required"``, or the name of the one function to call."""
    if value in _TOOL_CHOICE_MODES:
        return common_pb2.ToolChoice(mode=_TOOL_CHOICE_MODES[value])
    return common_pb2.ToolChoice(function_name=value)


def truncation(value: TruncationStrategy | Literal["auto"] | int) -> common_pb2.TruncationStrategy:
    """``"auto"``, a number of last messages to keep, or a TruncationStrategy."""
    if isinstance(value, int):
        value = TruncationStrategy("last_messages", value)
    elif isinstance(value, str):
        value = TruncationStrategy(value)
    if value.type == "last_messages":
        return common_pb2.TruncationStrategy(
            type=common_pb2.TruncationStrategy.LAST_MESSAGES, last_messages=value.last_messages or 0
        )
    return common_pb2.TruncationStrategy(type=common_pb2.TruncationStrategy.AUTO)


def response_format(value: ResponseFormat | str | Mapping[str, Any]) -> common_pb2.ResponseFormat:
    """``"text"``, ``"json_object"``, a JSON schema as a dict (or OpenAI's ``{"type": "json_schema",
    "json_schema": {...}}``), or a ResponseFormat."""
    if isinstance(value, str):
        value = ResponseFormat(type=_literal_format(value))
    elif isinstance(value, Mapping):
        value = _format_from_dict(value)
    result = common_pb2.ResponseFormat(type=_RESPONSE_TYPES[value.type])
    if value.type == "json_schema":
        result.json_schema.name = value.name
        result.json_schema.description = value.description
        result.json_schema.strict = value.strict
        if value.schema is not None:
            result.json_schema.schema.CopyFrom(struct(value.schema))
    return result


def _literal_format(value: str) -> Literal["text", "json_object", "json_schema"]:
    for known in _FORMAT_NAMES:
        if value == known:
            return known
    raise ValueError(f"response_format must be text, json_object or json_schema, not {value!r}")


def _format_from_dict(value: Mapping[str, Any]) -> ResponseFormat:
    kind = value.get("type")
    if kind in ("text", "json_object"):
        return ResponseFormat(type=_literal_format(str(kind)))
    body: Mapping[str, Any] = value.get("json_schema", value) if kind == "json_schema" else value
    schema = body.get("schema", body if kind is None else None)
    return ResponseFormat(
        type="json_schema",
        name=str(body.get("name", "")),
        description=str(body.get("description", "")),
        schema=schema,
        strict=bool(body.get("strict", False)),
    )


def output_text(value: Any) -> str:
    """A tool's return value as the text sent to the model: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def tool_results(spec: ToolResultsSpec) -> list[common_pb2.ToolResult]:
    if isinstance(spec, Mapping):
        return [common_pb2.ToolResult(tool_call_id=k, output=output_text(v)) for k, v in spec.items()]
    results: list[common_pb2.ToolResult] = []
    for item in spec:
        if isinstance(item, ToolResult):
            results.append(common_pb2.ToolResult(tool_call_id=item.tool_call_id, output=item.output))
        else:
            results.append(
                common_pb2.ToolResult(
                    tool_call_id=str(item["tool_call_id"]), output=output_text(item["output"])
                )
            )
    return results


def order(value: Order) -> common_pb2.SortOrder.ValueType:
    if value is None:
        return common_pb2.SORT_ORDER_UNSPECIFIED
    number = int(value) if isinstance(value, SortOrder) else int(SortOrder[value.upper()])
    return common_pb2.SortOrder.ValueType(number)


def labels(value: Mapping[str, str] | None) -> dict[str, str]:
    return dict(value or {})


def present(**fields: object) -> list[str]:
    """Names of the given fields that are not None (an update mask)."""
    return [name for name, value in fields.items() if value is not None]


def messages(specs: Sequence[MessageSpec] | None) -> list[message_pb2.MessageInput]:
    return [message_input(spec) for spec in specs or ()]
