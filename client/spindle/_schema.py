"""Describe a Python function as a function tool: name, docstring and a JSON schema of its parameters."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from spindle.types import FunctionTool

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
}


def describe_function(fn: Callable[..., Any]) -> FunctionTool:
    """A FunctionTool for ``fn``: its ``__name__``, the first paragraph of its docstring, and a schema
    from its annotated parameters (those without a default are required)."""
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, parameter in signature.parameters.items():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        properties[name] = _schema_of(hints.get(name, Any))
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    doc = inspect.getdoc(fn) or ""
    return FunctionTool(name=fn.__name__, description=doc.split("\n\n")[0].strip(), parameters=parameters)


def _schema_of(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _schema_of(options[0]) if len(options) == 1 else {}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(annotation))}
    json_type = _JSON_TYPES.get(origin or annotation)
    return {"type": json_type} if json_type else {}
