"""The contract between the engine and a model: one streamed chat turn at a time.

A backend knows nothing of runs, threads or storage. The engine hands it a `ModelRequest`
(chat messages in OpenAI's roles, function tools, sampling parameters) and consumes the
`ModelChunk`s it yields; errors come out as `ModelError` with an OpenAI-style code.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCallSpec:
    """A complete tool call, as it is sent back to the model in an assistant message."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCallSpec, ...] = ()  # role == "assistant" only
    tool_call_id: str = ""  # role == "tool" only


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)  # JSON schema
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ModelRequest:
    model: str  # the provider's own model name (without the "provider/" prefix)
    messages: tuple[ChatMessage, ...]
    tools: tuple[FunctionSpec, ...] = ()
    # "auto" | "none" | "required" | a function name that must be called
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None  # completion tokens for this turn
    # None (text), {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
    response_format: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call; pieces with the same index belong to one call."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class UsageReport:
    prompt_tokens: int
    completion_tokens: int


FinishReason = Literal["stop", "tool_calls", "length", "content_filter"]


@dataclass(frozen=True, slots=True)
class Finish:
    reason: FinishReason


ModelChunk = TextDelta | ToolCallDelta | UsageReport | Finish


class ModelError(Exception):
    """A model call that failed. `code` is OpenAI-style snake_case (server_error, ...)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class ModelBackend(Protocol):
    """One provider of models (the builtin script, or an OpenAI-compatible endpoint)."""

    name: str

    def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        """Stream one chat turn: deltas as they come, at most one UsageReport, one Finish last.

        A tool call's id and name come in its first ToolCallDelta; later pieces carry argument
        text. Closing the generator (or cancelling its consumer) must close the call at once.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Estimate the tokens of `text` (for prompt budgets and truncation)."""
        ...

    async def aclose(self) -> None: ...
