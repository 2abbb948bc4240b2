"""Request protos for every method, from the keyword arguments of the public surface.

The sync and async resources call the same builders, so they differ only in ``await``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypedDict, cast

from spindle import _encode
from spindle._encode import MessageSpec, Order, ToolSpec
from spindle.enums import MessageRole, RunStatus
from spindle.tools import Tools, as_tool_functions, tool_specs
from spindle.types import ResponseFormat, TruncationStrategy
from spindle.v1 import assistant_pb2, message_pb2, run_pb2, thread_pb2


class HasId(Protocol):
    @property
    def id(self) -> str: ...


IdLike = str | HasId
"""An id, or an object with an ``id`` (an Assistant, Thread, Message or Run)."""


def as_id(value: IdLike) -> str:
    return value if isinstance(value, str) else value.id


class RunOverrides(TypedDict, total=False):
    """Per-run overrides of the assistant's configuration, but its tools (all optional)."""

    instructions: str
    additional_instructions: str
    additional_messages: Sequence[MessageSpec]
    model: str
    tool_choice: str
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    max_prompt_tokens: int
    max_completion_tokens: int
    truncation_strategy: TruncationStrategy | Literal["auto"] | int
    response_format: ResponseFormat | str | Mapping[str, Any]
    labels: Mapping[str, str]


class RunOptions(RunOverrides, total=False):
    """Per-run overrides of the assistant's configuration (all optional); ``tools`` replaces its tools."""

    tools: Sequence[ToolSpec]


class AssistantOptions(TypedDict, total=False):
    """An assistant's configuration (all optional)."""

    name: str
    description: str
    model: str
    instructions: str
    tools: Sequence[ToolSpec]
    temperature: float
    top_p: float
    max_tokens: int
    max_prompt_tokens: int
    truncation_strategy: TruncationStrategy | Literal["auto"] | int
    response_format: ResponseFormat | str | Mapping[str, Any]
    labels: Mapping[str, str]


# ---- assistants -------------------------------------------------------------------------------


def _fill_assistant(
    request: assistant_pb2.CreateAssistantRequest | assistant_pb2.UpdateAssistantRequest,
    options: AssistantOptions,
) -> None:
    for name in ("name", "description", "model", "instructions"):
        if name in options:
            setattr(request, name, options[name])
    if "tools" in options:
        request.tools.extend(_encode.tools(options["tools"]))
    completion = request.completion_options
    if "temperature" in options:
        completion.temperature = options["temperature"]
    if "top_p" in options:
        completion.top_p = options["top_p"]
    if "max_tokens" in options:
        completion.max_tokens = options["max_tokens"]
    prompt = request.prompt_truncation_options
    if "max_prompt_tokens" in options:
        prompt.max_prompt_tokens = options["max_prompt_tokens"]
    if "truncation_strategy" in options:
        prompt.truncation_strategy.CopyFrom(_encode.truncation(options["truncation_strategy"]))
    if "response_format" in options:
        request.response_format.CopyFrom(_encode.response_format(options["response_format"]))
    if "labels" in options:
        request.labels.update(options["labels"])


_ASSISTANT_MASK = {
    "temperature": "completion_options",
    "top_p": "completion_options",
    "max_tokens": "completion_options",
    "max_prompt_tokens": "prompt_truncation_options",
    "truncation_strategy": "prompt_truncation_options",
}


def create_assistant(options: AssistantOptions, request_id: str) -> assistant_pb2.CreateAssistantRequest:
    request = assistant_pb2.CreateAssistantRequest(request_id=request_id)
    _fill_assistant(request, options)
    return request


def update_assistant(
    assistant_id: str, options: AssistantOptions, request_id: str
) -> assistant_pb2.UpdateAssistantRequest:
    """Only the given options change (they are named in the update mask)."""
    request = assistant_pb2.UpdateAssistantRequest(assistant_id=assistant_id, request_id=request_id)
    _fill_assistant(request, options)
    paths = dict.fromkeys(_ASSISTANT_MASK.get(name, name) for name in options)
    request.update_mask.paths.extend(paths)
    return request


def list_assistants(page_size: int | None, order: Order) -> assistant_pb2.ListAssistantsRequest:
    return assistant_pb2.ListAssistantsRequest(page_size=page_size or 0, order=_encode.order(order))


# ---- threads ----------------------------------------------------------------------------------


def create_thread(
    *,
    name: str | None,
    description: str | None,
    labels: Mapping[str, str] | None,
    messages: Sequence[MessageSpec] | None,
    request_id: str,
) -> thread_pb2.CreateThreadRequest:
    return thread_pb2.CreateThreadRequest(
        name=name or "",
        description=description or "",
        labels=_encode.labels(labels),
        messages=_encode.messages(messages),
        request_id=request_id,
    )


def update_thread(
    thread_id: str,
    *,
    name: str | None,
    description: str | None,
    labels: Mapping[str, str] | None,
    request_id: str,
) -> thread_pb2.UpdateThreadRequest:
    request = thread_pb2.UpdateThreadRequest(
        thread_id=thread_id,
        name=name or "",
        description=description or "",
        labels=_encode.labels(labels),
        request_id=request_id,
    )
    request.update_mask.paths.extend(_encode.present(name=name, description=description, labels=labels))
    return request


def list_threads(page_size: int | None, order: Order) -> thread_pb2.ListThreadsRequest:
    return thread_pb2.ListThreadsRequest(page_size=page_size or 0, order=_encode.order(order))


# ---- messages ---------------------------------------------------------------------------------


def create_message(
    thread_id: str,
    content: str | Sequence[str],
    *,
    role: MessageRole | str,
    labels: Mapping[str, str] | None,
    request_id: str,
) -> message_pb2.CreateMessageRequest:
    request = message_pb2.CreateMessageRequest(
        thread_id=thread_id, role=_encode.role(role), labels=_encode.labels(labels), request_id=request_id
    )
    if isinstance(content, str):
        request.text = content
    else:
        for part in content:
            request.content.add().text.text = part
    return request


def list_messages(
    thread_id: str, run_id: str | None, page_size: int | None, order: Order
) -> message_pb2.ListMessagesRequest:
    return message_pb2.ListMessagesRequest(
        thread_id=thread_id, run_id=run_id or "", page_size=page_size or 0, order=_encode.order(order)
    )


# ---- runs -------------------------------------------------------------------------------------


def create_run(
    thread_id: str, assistant_id: str, options: RunOptions | RunOverrides, request_id: str
) -> run_pb2.CreateRunRequest:
    request = run_pb2.CreateRunRequest(thread_id=thread_id, assistant_id=assistant_id, request_id=request_id)
    for name in (
        "instructions",
        "additional_instructions",
        "model",
        "parallel_tool_calls",
        "temperature",
        "top_p",
        "max_prompt_tokens",
        "max_completion_tokens",
    ):
        if name in options:
            setattr(request, name, options[name])
    if "additional_messages" in options:
        request.additional_messages.extend(_encode.messages(options["additional_messages"]))
    if "tools" in options:
        request.tools.extend(_encode.tools(options["tools"]))  # type: ignore[typeddict-item]
        request.override_tools = True
    if "tool_choice" in options:
        request.tool_choice.CopyFrom(_encode.tool_choice(options["tool_choice"]))
    if "truncation_strategy" in options:
        request.truncation_strategy.CopyFrom(_encode.truncation(options["truncation_strategy"]))
    if "response_format" in options:
        request.response_format.CopyFrom(_encode.response_format(options["response_format"]))
    if "labels" in options:
        request.labels.update(options["labels"])
    return request


def list_runs(
    *,
    thread_id: str | None,
    assistant_id: str | None,
    statuses: Iterable[RunStatus] | None,
    labels: Mapping[str, str] | None,
    page_size: int | None,
    order: Order,
) -> run_pb2.ListRunsRequest:
    return run_pb2.ListRunsRequest(
        thread_id=thread_id or "",
        assistant_id=assistant_id or "",
        statuses=[run_pb2.RunStatus.ValueType(int(s)) for s in statuses or ()],
        labels=_encode.labels(labels),
        page_size=page_size or 0,
        order=_encode.order(order),
    )


def update_run(run_id: str, labels: Mapping[str, str], request_id: str) -> run_pb2.UpdateRunRequest:
    request = run_pb2.UpdateRunRequest(run_id=run_id, labels=dict(labels), request_id=request_id)
    request.update_mask.paths.append("labels")
    return request


def submit_tool_results(
    run_id: str, results: _encode.ToolResultsSpec, request_id: str
) -> run_pb2.SubmitToolResultsRequest:
    return run_pb2.SubmitToolResultsRequest(
        run_id=run_id, tool_results=_encode.tool_results(results), request_id=request_id
    )


def wait_run(run_id: str, timeout: float) -> run_pb2.WaitRunRequest:
    request = run_pb2.WaitRunRequest(run_id=run_id)
    request.timeout.FromNanoseconds(int(timeout * 1e9))
    return request


def list_steps(run_id: str, page_size: int | None, order: Order) -> run_pb2.ListRunStepsRequest:
    return run_pb2.ListRunStepsRequest(run_id=run_id, page_size=page_size or 0, order=_encode.order(order))


# The server's Wait answers after at most its timeout; the call's deadline leaves room beyond it.
WAIT_MARGIN = 5.0


def options_with_tools(overrides: RunOverrides, tools: Tools | None, declare: bool) -> RunOptions:
    """The overrides, plus the ``tools`` functions declared as the run's tools if ``declare``."""
    options = cast(RunOptions, dict(overrides))  # RunOverrides is RunOptions without "tools"
    if declare and tools is not None:
        options["tools"] = tool_specs(as_tool_functions(tools))
    return options
