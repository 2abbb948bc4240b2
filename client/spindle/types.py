"""Plain Python objects for the API's resources (built from protos by ``spindle._decode``).

They are frozen dataclasses with ``datetime`` timestamps (UTC) and ``None`` for fields the
server did not set; ``raw`` fields are not kept, so they are cheap to copy and compare.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from spindle.enums import MessageRole, RunStatus

__all__ = [
    "Assistant",
    "FunctionTool",
    "Message",
    "ResponseFormat",
    "RunData",
    "RunError",
    "RunStep",
    "Thread",
    "ToolCall",
    "ToolCallDelta",
    "ToolResult",
    "TruncationStrategy",
    "Usage",
]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a run (or of one model turn)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RunError:
    """Why a run failed: a snake_case ``code`` (``model_error``, ``server_error``, ...) and a message."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model asked for; answer it by ``id``.

    ``arguments`` is the JSON text exactly as the model produced it; ``output`` is the submitted
    result (only on run steps).
    """

    id: str
    name: str
    arguments: str = "{}"
    output: str | None = None

    def parse_arguments(self) -> Any:
        """The arguments decoded from JSON (``{}`` when empty). Raises ``ValueError`` if malformed."""
        return json.loads(self.arguments) if self.arguments.strip() else {}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call while the model streams it: ``arguments`` appends to the call's so far."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The caller's answer to one tool call."""

    tool_call_id: str
    output: str


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function the model may call: a name, a description and a JSON schema of the arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class TruncationStrategy:
    """How the thread is cut to fit the prompt: ``auto``, or only the last ``last_messages``."""

    type: Literal["auto", "last_messages"] = "auto"
    last_messages: int | None = None


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """The reply's format: ``text``, ``json_object``, or ``json_schema`` with ``schema``."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = ""
    description: str = ""
    schema: Mapping[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class Assistant:
    """An assistant: a model with instructions, tools and default options."""

    id: str
    name: str = ""
    description: str = ""
    model: str = ""
    instructions: str = ""
    tools: tuple[FunctionTool, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None
    truncation_strategy: TruncationStrategy | None = None
    response_format: ResponseFormat | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    created_by: str = ""


@dataclass(frozen=True, slots=True)
class Thread:
    """A conversation: an ordered list of messages that runs read and reply to."""

    id: str
    name: str = ""
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    created_by: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    """A message of a thread; ``text`` joins its text ``parts``."""

    id: str
    thread_id: str
    role: MessageRole
    parts: tuple[str, ...] = ()
    run_id: str = ""
    assistant_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    created_by: str = ""

    @property
    def text(self) -> str:
        """All text parts, joined."""
        return "".join(self.parts)


@dataclass(frozen=True, slots=True)
class RunStep:
    """One step of a run: the reply message it created, or a round of tool calls."""

    id: str
    run_id: str
    thread_id: str = ""
    assistant_id: str = ""
    type: Literal["message_creation", "tool_calls", "unspecified"] = "unspecified"
    status: Literal["in_progress", "cancelled", "failed", "completed", "expired", "unspecified"] = (
        "unspecified"
    )
    message_id: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    last_error: RunError | None = None
    usage: Usage | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None


@dataclass(eq=False, slots=False)
class RunData:
    """Every field of a run, as last seen. Run handles (``Run``, ``AsyncRun``) extend it."""

    id: str
    assistant_id: str = ""
    thread_id: str = ""
    created_by: str = ""
    status: RunStatus = RunStatus.RUN_STATUS_UNSPECIFIED
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    failed_at: datetime | None = None
    expires_at: datetime | None = None
    updated_at: datetime | None = None
    last_error: RunError | None = None
    incomplete_reason: str | None = None
    required_tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage | None = None
    model: str = ""
    instructions: str = ""
    additional_instructions: str = ""
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None
    truncation_strategy: TruncationStrategy | None = None
    response_format: ResponseFormat | None = None
    reply: Message | None = None
    attempt: int = 0
