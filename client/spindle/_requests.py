"""Every method's call, from the keyword arguments of the public surface: a :class:`Call`.

A Call says all there is to decide about one unary call: the method, the request (with its
``request_id``, made once per logical call so that every retry carries the same one), the
response type and how to read it. The sync and async resources build the same Calls and hand them
to their transport, so the twins differ only in ``await``; a listing is a :class:`Listing`, the
Call of one page for a page token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypedDict, TypeVar, cast

from google.protobuf.message import Message as Proto

from spindle import _decode, _encode
from spindle._encode import MessageSpec, Order, ToolResultsSpec, ToolSpec
from spindle._paging import Page
from spindle.enums import MessageRole, RunStatus
from spindle.tools import Tools, as_tool_functions, tool_specs
from spindle.types import Assistant, Message, ResponseFormat, RunStep, Thread, TruncationStrategy
from spindle.v1 import assistant_pb2, message_pb2, run_pb2, thread_pb2

R = TypeVar("R", bound=Proto)
T = TypeVar("T")
Service = Literal["assistants", "threads", "messages", "runs"]


@dataclass(frozen=True, slots=True)
class Call(Generic[R, T]):
    """One unary call, ready for either transport: ``service.method(request)``, read by ``decode``."""

    service: Service
    method: str
    request: Proto
    response: type[R]
    decode: Callable[[R], T]
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Listing(Generic[R, T]):
    """A list method: the Call of each page, by page token (the request has a ``page_token``)."""

    service: Service
    method: str
    request: Proto
    response: type[R]
    decode: Callable[[R], Page[T]]

    def page(self, token: str) -> Call[R, Page[T]]:
        request = type(self.request)()
        request.CopyFrom(self.request)
        request.page_token = token  # type: ignore[attr-defined]  # every list request has one
        return Call(self.service, self.method, request, self.response, self.decode)


def _run(value: run_pb2.Run) -> run_pb2.Run:
    return value  # runs become handles in the resource (they need it)


def _nothing(_: Proto) -> None:
    return None


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


def create_assistant(
    options: AssistantOptions, request_id: str | None
) -> Call[assistant_pb2.Assistant, Assistant]:
    rid = _encode.request_id(request_id)
    request = assistant_pb2.CreateAssistantRequest(request_id=rid)
    _fill_assistant(request, options)
    return Call("assistants", "Create", request, assistant_pb2.Assistant, _decode.assistant, rid)


def get_assistant(assistant_id: IdLike) -> Call[assistant_pb2.Assistant, Assistant]:
    request = assistant_pb2.GetAssistantRequest(assistant_id=as_id(assistant_id))
    return Call("assistants", "Get", request, assistant_pb2.Assistant, _decode.assistant)


def update_assistant(
    assistant_id: IdLike, options: AssistantOptions, request_id: str | None
) -> Call[assistant_pb2.Assistant, Assistant]:
    """Only the given options change (they are named in the update mask)."""
    rid = _encode.request_id(request_id)
    request = assistant_pb2.UpdateAssistantRequest(assistant_id=as_id(assistant_id), request_id=rid)
    _fill_assistant(request, options)
    paths = dict.fromkeys(_ASSISTANT_MASK.get(name, name) for name in options)
    request.update_mask.paths.extend(paths)
    return Call("assistants", "Update", request, assistant_pb2.Assistant, _decode.assistant, rid)


def delete_assistant(
    assistant_id: IdLike, request_id: str | None
) -> Call[assistant_pb2.DeleteAssistantResponse, None]:
    rid = _encode.request_id(request_id)
    request = assistant_pb2.DeleteAssistantRequest(assistant_id=as_id(assistant_id), request_id=rid)
    return Call("assistants", "Delete", request, assistant_pb2.DeleteAssistantResponse, _nothing, rid)


def list_assistants(
    page_size: int | None, order: Order
) -> Listing[assistant_pb2.ListAssistantsResponse, Assistant]:
    request = assistant_pb2.ListAssistantsRequest(page_size=page_size or 0, order=_encode.order(order))

    def decode(page: assistant_pb2.ListAssistantsResponse) -> Page[Assistant]:
        return [_decode.assistant(a) for a in page.assistants], page.next_page_token

    return Listing("assistants", "List", request, assistant_pb2.ListAssistantsResponse, decode)


# ---- threads ----------------------------------------------------------------------------------


def create_thread(
    *,
    name: str | None,
    description: str | None,
    labels: Mapping[str, str] | None,
    messages: Sequence[MessageSpec] | None,
    request_id: str | None,
) -> Call[thread_pb2.Thread, Thread]:
    rid = _encode.request_id(request_id)
    request = thread_pb2.CreateThreadRequest(
        name=name or "",
        description=description or "",
        labels=_encode.labels(labels),
        messages=_encode.messages(messages),
        request_id=rid,
    )
    return Call("threads", "Create", request, thread_pb2.Thread, _decode.thread, rid)


def get_thread(thread_id: IdLike) -> Call[thread_pb2.Thread, Thread]:
    request = thread_pb2.GetThreadRequest(thread_id=as_id(thread_id))
    return Call("threads", "Get", request, thread_pb2.Thread, _decode.thread)


def update_thread(
    thread_id: IdLike,
    *,
    name: str | None,
    description: str | None,
    labels: Mapping[str, str] | None,
    request_id: str | None,
) -> Call[thread_pb2.Thread, Thread]:
    """Only the fields given (not None) change (they are named in the update mask)."""
    rid = _encode.request_id(request_id)
    request = thread_pb2.UpdateThreadRequest(
        thread_id=as_id(thread_id),
        name=name or "",
        description=description or "",
        labels=_encode.labels(labels),
        request_id=rid,
    )
    request.update_mask.paths.extend(_encode.present(name=name, description=description, labels=labels))
    return Call("threads", "Update", request, thread_pb2.Thread, _decode.thread, rid)


def delete_thread(thread_id: IdLike, request_id: str | None) -> Call[thread_pb2.DeleteThreadResponse, None]:
    rid = _encode.request_id(request_id)
    request = thread_pb2.DeleteThreadRequest(thread_id=as_id(thread_id), request_id=rid)
    return Call("threads", "Delete", request, thread_pb2.DeleteThreadResponse, _nothing, rid)


def list_threads(page_size: int | None, order: Order) -> Listing[thread_pb2.ListThreadsResponse, Thread]:
    request = thread_pb2.ListThreadsRequest(page_size=page_size or 0, order=_encode.order(order))

    def decode(page: thread_pb2.ListThreadsResponse) -> Page[Thread]:
        return [_decode.thread(t) for t in page.threads], page.next_page_token

    return Listing("threads", "List", request, thread_pb2.ListThreadsResponse, decode)


# ---- messages ---------------------------------------------------------------------------------


def create_message(
    thread_id: IdLike,
    content: str | Sequence[str],
    *,
    role: MessageRole | str,
    labels: Mapping[str, str] | None,
    request_id: str | None,
) -> Call[message_pb2.Message, Message]:
    rid = _encode.request_id(request_id)
    request = message_pb2.CreateMessageRequest(
        thread_id=as_id(thread_id), role=_encode.role(role), labels=_encode.labels(labels), request_id=rid
    )
    if isinstance(content, str):
        request.text = content
    else:
        for part in content:
            request.content.add().text.text = part
    return Call("messages", "Create", request, message_pb2.Message, _decode.message, rid)


def get_message(message_id: IdLike) -> Call[message_pb2.Message, Message]:
    request = message_pb2.GetMessageRequest(message_id=as_id(message_id))
    return Call("messages", "Get", request, message_pb2.Message, _decode.message)


def list_messages(
    thread_id: IdLike, run_id: IdLike | None, page_size: int | None, order: Order
) -> Listing[message_pb2.ListMessagesResponse, Message]:
    request = message_pb2.ListMessagesRequest(
        thread_id=as_id(thread_id),
        run_id=as_id(run_id) if run_id is not None else "",
        page_size=page_size or 0,
        order=_encode.order(order),
    )

    def decode(page: message_pb2.ListMessagesResponse) -> Page[Message]:
        return [_decode.message(m) for m in page.messages], page.next_page_token

    return Listing("messages", "List", request, message_pb2.ListMessagesResponse, decode)


# ---- runs -------------------------------------------------------------------------------------


def create_run(
    thread_id: IdLike, assistant_id: IdLike, options: RunOptions, request_id: str | None
) -> Call[run_pb2.Run, run_pb2.Run]:
    rid = _encode.request_id(request_id)
    request = run_pb2.CreateRunRequest(
        thread_id=as_id(thread_id), assistant_id=as_id(assistant_id), request_id=rid
    )
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
        request.tools.extend(_encode.tools(options["tools"]))
        request.override_tools = True
    if "tool_choice" in options:
        request.tool_choice.CopyFrom(_encode.tool_choice(options["tool_choice"]))
    if "truncation_strategy" in options:
        request.truncation_strategy.CopyFrom(_encode.truncation(options["truncation_strategy"]))
    if "response_format" in options:
        request.response_format.CopyFrom(_encode.response_format(options["response_format"]))
    if "labels" in options:
        request.labels.update(options["labels"])
    return Call("runs", "Create", request, run_pb2.Run, _run, rid)


def get_run(run_id: IdLike) -> Call[run_pb2.Run, run_pb2.Run]:
    return Call("runs", "Get", run_pb2.GetRunRequest(run_id=as_id(run_id)), run_pb2.Run, _run)


def get_last_run(thread_id: IdLike) -> Call[run_pb2.Run, run_pb2.Run]:
    request = run_pb2.GetLastRunByThreadRequest(thread_id=as_id(thread_id))
    return Call("runs", "GetLastByThread", request, run_pb2.Run, _run)


def list_runs(
    handle: Callable[[run_pb2.Run], T],
    *,
    thread_id: IdLike | None,
    assistant_id: IdLike | None,
    statuses: Iterable[RunStatus] | None,
    labels: Mapping[str, str] | None,
    page_size: int | None,
    order: Order,
) -> Listing[run_pb2.ListRunsResponse, T]:
    """Each run of a page becomes ``handle(run)``."""
    request = run_pb2.ListRunsRequest(
        thread_id=as_id(thread_id) if thread_id is not None else "",
        assistant_id=as_id(assistant_id) if assistant_id is not None else "",
        statuses=[run_pb2.RunStatus.ValueType(int(s)) for s in statuses or ()],
        labels=_encode.labels(labels),
        page_size=page_size or 0,
        order=_encode.order(order),
    )

    def decode(page: run_pb2.ListRunsResponse) -> Page[T]:
        return [handle(run) for run in page.runs], page.next_page_token

    return Listing("runs", "List", request, run_pb2.ListRunsResponse, decode)


def update_run(
    run_id: IdLike, labels: Mapping[str, str], request_id: str | None
) -> Call[run_pb2.Run, run_pb2.Run]:
    rid = _encode.request_id(request_id)
    request = run_pb2.UpdateRunRequest(run_id=as_id(run_id), labels=dict(labels), request_id=rid)
    request.update_mask.paths.append("labels")
    return Call("runs", "Update", request, run_pb2.Run, _run, rid)


def cancel_run(run_id: IdLike, request_id: str | None) -> Call[run_pb2.Run, run_pb2.Run]:
    rid = _encode.request_id(request_id)
    request = run_pb2.CancelRunRequest(run_id=as_id(run_id), request_id=rid)
    return Call("runs", "Cancel", request, run_pb2.Run, _run, rid)


def submit_tool_results(
    run_id: IdLike, results: ToolResultsSpec, request_id: str | None
) -> Call[run_pb2.Run, run_pb2.Run]:
    rid = _encode.request_id(request_id)
    request = run_pb2.SubmitToolResultsRequest(
        run_id=as_id(run_id), tool_results=_encode.tool_results(results), request_id=rid
    )
    return Call("runs", "SubmitToolResults", request, run_pb2.Run, _run, rid)


def wait_run(run_id: IdLike, timeout: float) -> Call[run_pb2.Run, run_pb2.Run]:
    request = run_pb2.WaitRunRequest(run_id=as_id(run_id))
    request.timeout.FromNanoseconds(int(timeout * 1e9))
    return Call("runs", "Wait", request, run_pb2.Run, _run)


def list_steps(
    run_id: IdLike, page_size: int | None, order: Order
) -> Listing[run_pb2.ListRunStepsResponse, RunStep]:
    request = run_pb2.ListRunStepsRequest(
        run_id=as_id(run_id), page_size=page_size or 0, order=_encode.order(order)
    )

    def decode(page: run_pb2.ListRunStepsResponse) -> Page[RunStep]:
        return [_decode.run_step(s) for s in page.steps], page.next_page_token

    return Listing("runs", "ListSteps", request, run_pb2.ListRunStepsResponse, decode)


# The server's Wait answers after at most its timeout; the call's deadline leaves room beyond it.
WAIT_MARGIN = 5.0


def options_with_tools(overrides: RunOverrides, tools: Tools | None, declare: bool) -> RunOptions:
    """The overrides, plus the ``tools`` functions declared as the run's tools if ``declare``."""
    options = cast(RunOptions, dict(overrides))  # RunOverrides is RunOptions without "tools"
    if declare and tools is not None:
        options["tools"] = tool_specs(as_tool_functions(tools))
    return options
