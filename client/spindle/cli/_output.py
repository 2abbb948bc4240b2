"""Printing results: JSON for scripts (``--json``), short lines for people."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TextIO

from spindle.results import RunEvent, RunResult
from spindle.types import Assistant, Message, RunData, RunStep, Thread


def jsonable(value: Any) -> Any:
    """Dataclasses, enums (by name), datetimes (ISO 8601) and containers as plain JSON values."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, RunResult | Message):
            fields["text"] = value.text
        if isinstance(value, RunEvent):
            fields["is_terminal"] = value.is_terminal
        return fields
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class Output:
    """Where and how the command writes what it has to say."""

    def __init__(self, stdout: TextIO, stderr: TextIO, *, as_json: bool) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.as_json = as_json

    def json(self, value: Any) -> None:
        self.stdout.write(json.dumps(jsonable(value), ensure_ascii=False) + "\n")
        self.stdout.flush()

    def line(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def note(self, text: str) -> None:
        """A remark for the person (stderr), never mixed into the data on stdout."""
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def item(self, value: Any) -> None:
        """One resource: as JSON, or as one summary line."""
        if self.as_json:
            self.json(value)
        else:
            self.line(summary(value))

    def items(self, values: Iterable[Any]) -> None:
        """A listing: a JSON array, or one summary line each."""
        if self.as_json:
            self.json(list(values))
            return
        for value in values:
            self.line(summary(value))

    def result(self, result: RunResult) -> None:
        if self.as_json:
            self.json(result)
            return
        if result.text is not None and not result.is_paused:
            self.line(result.text)
        if result.is_paused:
            for call in result.tool_calls or ():
                self.line(f"{call.id}\t{call.name}\t{call.arguments}")
            self.note(
                f"run {result.run_id} waits for tool results: spindle submit {result.run_id} --output ID=TEXT"
            )
        elif result.error is not None:
            self.note(f"run {result.run_id} {result.status_name}: {result.error}")


def summary(value: Any) -> str:
    """One tab-separated line that names the resource."""
    if isinstance(value, Assistant):
        return f"{value.id}\t{value.name}\t{value.model}"
    if isinstance(value, Thread):
        return f"{value.id}\t{value.name}"
    if isinstance(value, Message):
        return f"{value.id}\t{value.role.name.lower()}\t{value.text}"
    if isinstance(value, RunData):
        return f"{value.id}\t{value.status.name}\t{value.thread_id}\t{value.assistant_id}"
    if isinstance(value, RunStep):
        calls = ", ".join(f"{c.name}({c.arguments}) -> {c.output}" for c in value.tool_calls)
        return f"{value.id}\t{value.type}\t{value.status}\t{value.message_id or calls}"
    if isinstance(value, RunEvent):
        return f"{value.index}\t{value.type.name}\t{value.status.name}\t{value.delta or ''}"
    return str(value)
