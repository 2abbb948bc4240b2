"""Bad input for every method of the four services (issue 2, point 6/9).

Each case sends one malformed request and names the answer it must get: INVALID_ARGUMENT with the
BadRequest field path(s), NOT_FOUND with a *_NOT_FOUND reason, FAILED_PRECONDITION with its reason,
or RESOURCE_EXHAUSTED where grpc itself refuses the request before the server sees it. Every error
the server makes carries an ErrorInfo (UPPER_SNAKE reason, domain spindle.v1), and after every case
the server still answers. A case that shows a server bug is a strict xfail whose reason says what
goes wrong; fix the server, then drop the mark.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import assistant_pb2 as ap
from spindle.v1 import common_pb2 as cp
from spindle.v1 import message_pb2 as mp
from spindle.v1 import run_pb2 as rp
from spindle.v1 import thread_pb2 as tp
from support.server import ServerProcess
from support.stubs import Stubs, error_details

IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
FP = grpc.StatusCode.FAILED_PRECONDITION
RX = grpc.StatusCode.RESOURCE_EXHAUSTED
TIMEOUT = 10.0
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
WEATHER = '/tool get_weather {"city": "Paris"}'
TAB_KEY, BIG = "a\tb", "x" * 20_000  # BIG: over grpc's 16 KiB limit for metadata
PTO_F = "prompt_truncation_options"
PTO_MAX = f"{PTO_F}.max_prompt_tokens"
ACTIVE, NOT_WAITING, UNKNOWN_ID = "THREAD_HAS_ACTIVE_RUN", "RUN_NOT_WAITING_FOR_TOOLS", "UNKNOWN_TOOL_CALL_ID"

KINDS = ("asst", "thread", "msg", "run")
UNKNOWN = {kind: f"{kind}_{'0' * 24}" for kind in KINDS}
WRONG_PREFIX = dict(zip(KINDS, (UNKNOWN[kind] for kind in ("thread", "asst", "run", "msg")), strict=True))
NOT_FOUND = {
    kind: f"{name}_NOT_FOUND"
    for kind, name in zip(KINDS, ("ASSISTANT", "THREAD", "MESSAGE", "RUN"), strict=True)
}
RUN_METHODS = ["Create", "Get", "GetLastByThread", "List", "Update", "Cancel", "SubmitToolResults"]
SERVICES = {
    "AssistantService": ("assistants", ["Create", "Get", "Update", "Delete", "List"]),
    "ThreadService": ("threads", ["Create", "Get", "Update", "Delete", "List"]),
    "MessageService": ("messages", ["Create", "Get", "List"]),
    "RunService": ("runs", [*RUN_METHODS, "Wait", "ListSteps", "Listen"]),
}
ALL_METHODS = [f"{service}.{name}" for service, (_, names) in SERVICES.items() for name in names]


@dataclass(frozen=True)
class Raw:
    """Request bytes sent as they are, bypassing the generated serializer."""

    body: bytes


@dataclass(frozen=True)
class Case:
    id: str
    method: str  # "Service.Method"
    build: Callable[[Env], Any]  # the request (may first make the resources it needs)
    code: grpc.StatusCode
    fields: tuple[str, ...] = ()
    reason: str | None = None
    transport: bool = False  # grpc answers by itself: no spindle error details
    exact: bool = True  # the violations name exactly `fields` (else: at least these)
    metadata: tuple[tuple[str, str], ...] = ()
    bug: str | None = None


OBSERVED: dict[str, tuple[grpc.StatusCode, bool]] = {}  # case id -> (code, a known bug)


def case(
    method: str,
    name: str,
    build: Callable[[Env], Any],
    code: grpc.StatusCode,
    *fields: str,
    bug: str | None = None,
    **options: Any,
) -> Any:
    ident = f"{method}: {name}"
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(Case(ident, method, build, code, fields, bug=bug, **options), id=ident, marks=marks)


def invalid(method: str, *rows: tuple[Any, ...]) -> list[Any]:
    """Rows of (name, build, field(s)[, bug]): INVALID_ARGUMENT with exactly those fields violated."""
    return [
        case(method, row[0], row[1], IA, *fields, bug=row[3] if len(row) > 3 else None)
        for row in rows
        for fields in [(row[2],) if isinstance(row[2], str) else row[2]]
    ]


def invoke(stubs: Stubs, method: str, request: Any, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    service, name = method.split(".")
    if isinstance(request, Raw):
        path = f"/spindle.v1.{service}/{name}"
        if name == "Listen":
            return list(stubs.channel.unary_stream(path)(request.body, timeout=TIMEOUT, metadata=metadata))
        return stubs.channel.unary_unary(path)(request.body, timeout=TIMEOUT, metadata=metadata)
    call = getattr(getattr(stubs, SERVICES[service][0]), name)
    if name == "Listen":
        return list(call(request, timeout=TIMEOUT, metadata=metadata))
    return call(request, timeout=TIMEOUT, metadata=metadata)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


def deep_schema(depth: int) -> ap.CreateAssistantRequest:
    """Parameters of `depth` nested JSON objects (built in place: a copy would hit upb's limit here)."""
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    request = ap.CreateAssistantRequest(tools=[tool("deep")])
    request.tools[0].function.parameters.update(value)
    return request


def tool(name: str = "get_weather", **fields: Any) -> cp.Tool:
    return cp.Tool(function=cp.FunctionTool(name=name, **fields))


def part(text: str) -> mp.ContentPart:
    return mp.ContentPart(text=mp.TextPart(text=text))


def results(*pairs: tuple[str, str]) -> list[cp.ToolResult]:
    return [cp.ToolResult(tool_call_id=call_id, output=output) for call_id, output in pairs]


def forged(token: str, cursor: object) -> str:
    """The token with its cursor replaced (an opaque token is tampered with instead)."""
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        body["s"] = cursor
    except (ValueError, TypeError, KeyError):
        return token[::-1]
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


DEEP_TOKEN = base64.urlsafe_b64encode(b"[" * 50_000).decode()


class Env:
    """The resources cases point at, made on first use and shared by the module."""

    def __init__(self, stubs: Stubs) -> None:
        self.s = stubs
        self._made: dict[str, Any] = {}
        self.case_runs: list[str] = []  # active runs a case started: cancelled after the case
        self.module_runs: list[str] = []

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    @property
    def assistant(self) -> ap.Assistant:
        return self._once("assistant", lambda: self.s.assistant(name="bad-input"))

    @property
    def tool_assistant(self) -> ap.Assistant:
        return self._once("tool_assistant", lambda: self.s.tool_assistant("get_weather"))

    @property
    def thread(self) -> tp.Thread:
        """Two messages, never a run."""
        return self._once("thread", lambda: self.s.thread("one", "two"))

    @property
    def message_id(self) -> str:
        request = mp.ListMessagesRequest(thread_id=self.thread.id)
        return self._once("message", lambda: self.s.messages.List(request, timeout=TIMEOUT).messages[0].id)

    def _tool_calls_run(self, text: str, runs: list[str]) -> rp.Run:
        run = self.s.start(text, self.tool_assistant)
        runs.append(run.id)
        run = self.s.wait(run.id)
        assert run.status == rp.TOOL_CALLS, run
        return run

    @property
    def tool_run(self) -> rp.Run:
        """In TOOL_CALLS for one call of get_weather until the module ends."""
        return self._once("tool_run", lambda: self._tool_calls_run(WEATHER, self.module_runs))

    @property
    def call_id(self) -> str:
        return self.tool_run.required_tool_calls[0].id

    @property
    def done_run(self) -> rp.Run:
        """COMPLETED after one tool round trip (two steps); `done_results` were its answers."""

        def make() -> rp.Run:
            run = self._tool_calls_run(WEATHER, [])
            answers = results((run.required_tool_calls[0].id, '{"temp": 21}'))
            self._made["done_results"] = answers
            self.s.runs.SubmitToolResults(rp.SubmitToolResultsRequest(run_id=run.id, tool_results=answers))
            run = self.s.wait(run.id)
            assert run.status == rp.COMPLETED, run
            return run

        return self._once("done_run", make)

    @property
    def done_results(self) -> list[cp.ToolResult]:
        assert self.done_run
        return list(self._made["done_results"])

    def active_run(self) -> rp.Run:
        run = self.s.start("/sleep 5", self.assistant)
        self.case_runs.append(run.id)
        return run

    def two_call_run(self) -> rp.Run:
        run = self._tool_calls_run(WEATHER + '\n/tool get_weather {"city": "Oslo"}', self.case_runs)
        assert len(run.required_tool_calls) == 2, run
        return run

    def token(self, method: str, request: Any) -> str:
        """next_page_token of a first page of one item (each listing here has two or more)."""
        assert self.assistant and self.thread and self.tool_run and self.done_run
        request.page_size = 1
        token: str = invoke(self.s, method, request).next_page_token
        assert token, f"{method} gave no next_page_token"
        return token

    def cancel(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            with contextlib.suppress(grpc.RpcError):
                self.s.runs.Cancel(rp.CancelRunRequest(run_id=run_id), timeout=TIMEOUT)
        run_ids.clear()


# ---- case generators -------------------------------------------------------------------------------


def id_cases(method: str, field: str, kind: str, make: Callable[[Env, str], Any]) -> list[Any]:
    return [
        *invalid(
            method,
            (f"{field} missing", lambda e: make(e, ""), field),
            (f"{field} with a wrong prefix", lambda e: make(e, WRONG_PREFIX[kind]), field),
            (f"{field} of only the prefix", lambda e: make(e, f"{kind}_"), field),
            (f"{field} of 200 characters", lambda e: make(e, f"{kind}_{'a' * 200}"), field),
            (f"{field} not ASCII", lambda e: make(e, f"{kind}_ÿ"), field),
        ),
        case(method, f"{field} unknown", lambda e: make(e, UNKNOWN[kind]), NF, reason=NOT_FOUND[kind]),
    ]


def label_cases(method: str, make: Callable[[Env, dict[str, str]], Any], field: str = "labels") -> list[Any]:
    many, key = {f"k{i}": "v" for i in range(17)}, "k" * 65
    return invalid(
        method,
        (f"{field}: 17 pairs", lambda e: make(e, many), field),
        (f"{field}: 65-char key", lambda e: make(e, {key: "v"}), f"{field}[{key!r}]"),
        (f"{field}: 513-char value", lambda e: make(e, {"k": "v" * 513}), f"{field}['k']"),
        (f"{field}: empty key", lambda e: make(e, {"": "v"}), f"{field}['']"),
        (f"{field}: key with a tab", lambda e: make(e, {TAB_KEY: "v"}), f"{field}[{TAB_KEY!r}]"),
    )


def request_id_cases(method: str, make: Callable[[Env, str], Any]) -> list[Any]:
    return invalid(
        method,
        ("request_id with a space", lambda e: make(e, "a b"), "request_id"),
        ("request_id of 129 chars", lambda e: make(e, "r" * 129), "request_id"),
        ("request_id not ASCII", lambda e: make(e, "réquest"), "request_id"),
    )


def reuse_case(method: str, make: Callable[[Env, str, str], Any]) -> Any:
    """One request_id, first with the body make(env, id, "1") (which succeeds), then with body "2"."""

    def build(e: Env) -> Any:
        request_id = f"bad-input-{uuid.uuid4().hex}"
        invoke(e.s, method, make(e, request_id, "1"))
        return make(e, request_id, "2")

    name = "request_id reused with another body"
    return case(method, name, build, IA, "request_id", reason="REQUEST_ID_REUSED")


def tool_cases(method: str, make: Callable[[Env, list[cp.Tool]], Any]) -> list[Any]:
    name, params = "tools[0].function.name", "tools[0].function.parameters"
    rows = [
        ("tool name with a space", [tool("get weather")], name),
        ("tool name empty", [tool("")], name),
        ("tool name of 65 chars", [tool("f" * 65)], name),
        ("duplicate tool names", [tool("f"), tool("g"), tool("f")], "tools[2].function.name"),
        ("tool without a function", [cp.Tool()], "tools[0]"),
        ("129 tools", [tool(f"f{i}") for i in range(129)], "tools"),
        ("tool description of 1025 chars", [tool(description="d" * 1025)], "tools[0].function.description"),
        ("tool parameters over 64 KiB", [tool(parameters=struct({"p": "x" * 70_000}))], params),
        ("tool parameters with NaN", [tool(parameters=struct({"x": math.nan}))], params),
        ("tool parameters with Infinity", [tool(parameters=struct({"x": math.inf}))], params),
    ]
    return invalid(method, *((row[0], lambda e, t=row[1]: make(e, t), *row[2:]) for row in rows))


def completion_cases(
    method: str, make: Callable[[Env, str, Any], Any], prefix: str, max_field: str
) -> list[Any]:
    bad = [
        *(("temperature", value) for value in (2.5, -0.1, math.nan, math.inf)),
        *(("top_p", value) for value in (1.5, -0.5, math.nan)),
        *((max_field, value) for value in (0, -1)),
    ]
    return invalid(method, *((f"{n}={v}", lambda e, n=n, v=v: make(e, n, v), prefix + n) for n, v in bad))


def truncation_cases(method: str, make: Callable[[Env, cp.TruncationStrategy], Any], field: str) -> list[Any]:
    ts, last = cp.TruncationStrategy, f"{field}.last_messages"
    return invalid(
        method,
        ("truncation type 9", lambda e: make(e, ts(type=ts.Type.ValueType(9))), f"{field}.type"),
        ("last_messages without LAST_MESSAGES", lambda e: make(e, ts(type=ts.AUTO, last_messages=5)), last),
        ("LAST_MESSAGES with last_messages 0", lambda e: make(e, ts(type=ts.LAST_MESSAGES)), last),
        (
            "LAST_MESSAGES, last_messages -3",
            lambda e: make(e, ts(type=ts.LAST_MESSAGES, last_messages=-3)),
            last,
        ),
    )


def response_format_cases(method: str, make: Callable[[Env, cp.ResponseFormat], Any]) -> list[Any]:
    rf, schema, field = cp.ResponseFormat, struct({"type": "object"}), "response_format"
    rows = [
        ("response format type 9", rf(type=rf.Type.ValueType(9)), f"{field}.type"),
        ("JSON_SCHEMA without a schema", rf(type=rf.JSON_SCHEMA), f"{field}.json_schema.schema"),
        (
            "JSON_SCHEMA with a bad name",
            rf(type=rf.JSON_SCHEMA, json_schema=cp.JsonSchema(name="a b", schema=schema)),
            f"{field}.json_schema.name",
        ),
        (
            "json_schema with type TEXT",
            rf(type=rf.TEXT, json_schema=cp.JsonSchema(schema=schema)),
            f"{field}.json_schema",
        ),
    ]
    return invalid(method, *((name, lambda e, f=value: make(e, f), path) for name, value, path in rows))


def content_cases(method: str, make: Callable[..., Any], prefix: str) -> list[Any]:
    """make(env, **MessageInput fields); the violations are under `prefix`."""
    half = "h" * 128_001
    rows: list[tuple[Any, ...]] = [
        ("role 99", {"role": 99, "text": "hi"}, "role"),
        ("both text and content", {"text": "hi", "content": [part("hi")]}, "text"),
        ("neither text nor content", {}, "content"),
        ("an empty text part", {"content": [part("")]}, "content"),
        ("a part without text", {"content": [mp.ContentPart()]}, ("content[0]", "content")),
        ("33 content parts", {"content": [part("p")] * 33}, "content"),
        ("content over 256000 chars", {"content": [part(half), part(half)]}, "content"),
        ("NUL in a content part", {"content": [part("a\x00b")]}, "content[0].text"),
        ("text over 256000 chars", {"text": "t" * 256_001}, "text"),
        ("NUL in text", {"text": "a\x00b"}, "text"),
    ]
    return invalid(
        method, *((r[0], lambda e, f=r[1]: make(e, **f), fields(prefix, r[2]), *r[3:]) for r in rows)
    )


def fields(prefix: str, names: str | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(prefix + name for name in ((names,) if isinstance(names, str) else names))


OTHER_LISTING = {
    "AssistantService.List": ap.ListAssistantsRequest,
    "ThreadService.List": tp.ListThreadsRequest,
}


def list_cases(
    method: str, make: Callable[..., Any], other: str, filters: Callable[[Env], Any] | None
) -> list[Any]:
    """make(env, **request fields); tokens of the listing `other` must be refused."""

    def own(e: Env, **fields: Any) -> Any:
        return make(e, page_token=e.token(method, make(e)), **fields)

    def cursor(e: Env, value: object) -> Any:
        return make(e, page_token=forged(e.token(method, make(e)), value))

    token, other_request = "page_token", OTHER_LISTING[other]
    return invalid(
        method,
        ("page_size -1", lambda e: make(e, page_size=-1), "page_size"),
        ("order 7", lambda e: make(e, order=7), "order"),
        ("order -1", lambda e: make(e, order=-1), "order"),
        ("garbage page_token", lambda e: make(e, page_token="not a token!"), token),
        (
            "page_token of another listing",
            lambda e: make(e, page_token=e.token(other, other_request())),
            token,
        ),
        ("page_token reused with another order", lambda e: own(e, order=cp.ASC), token),
        ("page_token with a forged cursor", lambda e: cursor(e, "abc"), token),
        ("page_token with cursor 10**30", lambda e: cursor(e, 10**30), token),
        ("page_token with cursor Infinity", lambda e: cursor(e, math.inf), token),
        ("page_token of deeply nested JSON", lambda e: make(e, page_token=DEEP_TOKEN), token),
        *(
            [("page_token reused with other filters", lambda e: own(e, **filters(e)), token)]
            if filters
            else []
        ),
    )


def state(method: str, name: str, build: Callable[[Env], Any], code: grpc.StatusCode, reason: str) -> Any:
    return case(method, name, build, code, reason=reason)


def big_details(method: str, name: str, build: Callable[[Env], Any], field: str, **options: Any) -> Any:
    return case(method, name, build, IA, field, exact=False, **options)


def undecodable(method: str, name: str, build: Callable[[Env], Any], bug: str | None = None) -> Any:
    return case(method, name, build, IA, bug=bug, exact=False)


def too_big(method: str, name: str, build: Callable[[Env], Any], **options: Any) -> Any:
    return case(method, name, build, RX, transport=True, **options)


# ---- the table -------------------------------------------------------------------------------------

M = "AssistantService.Create"
CA, PTO = ap.CreateAssistantRequest, cp.PromptTruncationOptions
ASSISTANT_CREATE = [
    *invalid(
        M,
        ("name of 257 chars", lambda e: CA(name="n" * 257), "name"),
        ("NUL in name", lambda e: CA(name="a\x00b"), "name"),
        ("description of 1025 chars", lambda e: CA(description="d" * 1025), "description"),
        ("NUL in description", lambda e: CA(description="\x00"), "description"),
        ("instructions over 256000 chars", lambda e: CA(instructions="i" * 256_001), "instructions"),
        ("NUL in instructions", lambda e: CA(instructions="a\x00"), "instructions"),
        ("model of 257 chars", lambda e: CA(model="m" * 257), "model"),
        ("unknown model", lambda e: CA(model="no-such-model"), "model"),
        ("unknown provider", lambda e: CA(model="nope/gpt-4o"), "model"),
        ("provider without a model", lambda e: CA(model="builtin/"), "model"),
        ("max_prompt_tokens 0", lambda e: CA(prompt_truncation_options=PTO(max_prompt_tokens=0)), PTO_MAX),
    ),
    *label_cases(M, lambda e, labels: CA(labels=labels)),
    *tool_cases(M, lambda e, tools: CA(tools=tools)),
    *completion_cases(
        M,
        lambda e, n, v: CA(completion_options=cp.CompletionOptions(**{n: v})),
        "completion_options.",
        "max_tokens",
    ),
    *truncation_cases(
        M,
        lambda e, ts: CA(prompt_truncation_options=PTO(truncation_strategy=ts)),
        f"{PTO_F}.truncation_strategy",
    ),
    *response_format_cases(M, lambda e, rf: CA(response_format=rf)),
    *request_id_cases(M, lambda e, r: CA(name="x", request_id=r)),
    reuse_case(M, lambda e, r, v: CA(name=v, request_id=r)),
    undecodable(M, "tool parameters nested 40 deep", lambda e: deep_schema(40)),
    big_details(M, "500 tools with bad names", lambda e: CA(tools=[tool("bad name")] * 500), "tools"),
    too_big(M, "request over the 8 MiB limit", lambda e: CA(instructions="i" * (9 << 20))),
]


def update_assistant(e: Env, *paths: str, **fields: Any) -> ap.UpdateAssistantRequest:
    return ap.UpdateAssistantRequest(
        assistant_id=e.assistant.id, update_mask=FieldMask(paths=paths), **fields
    )


M, UA = "AssistantService.Update", update_assistant
JSON_SCHEMA = cp.ResponseFormat(type=cp.ResponseFormat.JSON_SCHEMA)
ASSISTANT_UPDATE = [
    *id_cases(M, "assistant_id", "asst", lambda e, i: ap.UpdateAssistantRequest(assistant_id=i, name="n")),
    *invalid(
        M,
        *(
            (f"update_mask {path!r}", lambda e, p=path: UA(e, p, name="n"), "update_mask")
            for path in ("id", "created_at", "no_such_field", "tools.function", "labels.x", "")
        ),
        ("name of 257 chars", lambda e: UA(e, "name", name="n" * 257), "name"),
        ("NUL in description", lambda e: UA(e, description="\x00"), "description"),
        ("unknown model", lambda e: UA(e, "model", model="nope/x"), "model"),
        (
            "duplicate tool names",
            lambda e: UA(e, "tools", tools=[tool("f"), tool("f")]),
            "tools[1].function.name",
        ),
        (
            "temperature NaN",
            lambda e: UA(e, completion_options={"temperature": math.nan}),
            "completion_options.temperature",
        ),
        (
            "JSON_SCHEMA without a schema",
            lambda e: UA(e, response_format=JSON_SCHEMA),
            "response_format.json_schema.schema",
        ),
    ),
    *label_cases(M, lambda e, labels: UA(e, "labels", labels=labels)),
    *request_id_cases(M, lambda e, r: UA(e, name="x", request_id=r)),
    reuse_case(M, lambda e, r, v: UA(e, "name", name=v, request_id=r)),
]

M = "AssistantService.Get"
GA, DA = ap.GetAssistantRequest, ap.DeleteAssistantRequest
ASSISTANT_OTHER = [
    *id_cases(M, "assistant_id", "asst", lambda e, i: GA(assistant_id=i)),
    case(M, "assistant_id with NUL", lambda e: GA(assistant_id="asst_\x00"), IA, "assistant_id"),
    undecodable(M, "garbage bytes as the body", lambda e: Raw(b"\xff\xff\xff\xff")),
    too_big(
        M,
        "metadata over 16 KiB",
        lambda e: GA(assistant_id=e.assistant.id),
        metadata=(("x-request-id", BIG),),
    ),
    *id_cases("AssistantService.Delete", "assistant_id", "asst", lambda e, i: DA(assistant_id=i)),
    *request_id_cases("AssistantService.Delete", lambda e, r: DA(assistant_id=e.assistant.id, request_id=r)),
    reuse_case(
        "AssistantService.Delete", lambda e, r, v: DA(assistant_id=e.s.assistant(name=v).id, request_id=r)
    ),
    *list_cases(
        "AssistantService.List", lambda e, **f: ap.ListAssistantsRequest(**f), "ThreadService.List", None
    ),
]

M = "ThreadService.Create"
CT, UT, DT, MI = tp.CreateThreadRequest, tp.UpdateThreadRequest, tp.DeleteThreadRequest, mp.MessageInput
THREADS = [
    *invalid(
        M,
        ("name of 257 chars", lambda e: CT(name="n" * 257), "name"),
        ("NUL in name", lambda e: CT(name="\x00"), "name"),
        ("description of 1025 chars", lambda e: CT(description="d" * 1025), "description"),
        ("33 messages", lambda e: CT(messages=[MI(text="m")] * 33), "messages"),
        ("NUL in a label value", lambda e: CT(labels={"k": "a\x00b"}), "labels['k']"),
    ),
    *content_cases(M, lambda e, **f: CT(messages=[MI(**f)]), "messages[0]."),
    *label_cases(M, lambda e, labels: CT(labels=labels)),
    *label_cases(M, lambda e, labels: CT(messages=[MI(text="m", labels=labels)]), "messages[0].labels"),
    big_details(
        M, "300 bad label keys", lambda e: CT(labels={f"{'k' * 70}{i}": "v" for i in range(300)}), "labels"
    ),
    undecodable(M, "invalid UTF-8 in name", lambda e: Raw(b"\x0a\x02\xff\xfe")),
    *request_id_cases(M, lambda e, r: CT(request_id=r)),
    reuse_case(M, lambda e, r, v: CT(name=v, request_id=r)),
    *id_cases("ThreadService.Get", "thread_id", "thread", lambda e, i: tp.GetThreadRequest(thread_id=i)),
    *id_cases("ThreadService.Update", "thread_id", "thread", lambda e, i: UT(thread_id=i, name="n")),
    *invalid(
        "ThreadService.Update",
        *(
            (
                f"update_mask {p!r}",
                lambda e, p=p: UT(thread_id=e.thread.id, update_mask=FieldMask(paths=[p])),
                "update_mask",
            )
            for p in ("messages", "id", "labels.k")
        ),
        ("name of 257 chars", lambda e: UT(thread_id=e.thread.id, name="n" * 257), "name"),
        ("NUL in description", lambda e: UT(thread_id=e.thread.id, description="\x00"), "description"),
    ),
    *label_cases("ThreadService.Update", lambda e, labels: UT(thread_id=e.thread.id, labels=labels)),
    *request_id_cases("ThreadService.Update", lambda e, r: UT(thread_id=e.thread.id, name="x", request_id=r)),
    reuse_case("ThreadService.Update", lambda e, r, v: UT(thread_id=e.thread.id, name=v, request_id=r)),
    *id_cases("ThreadService.Delete", "thread_id", "thread", lambda e, i: DT(thread_id=i)),
    *request_id_cases("ThreadService.Delete", lambda e, r: DT(thread_id=e.thread.id, request_id=r)),
    reuse_case("ThreadService.Delete", lambda e, r, v: DT(thread_id=e.s.thread(v).id, request_id=r)),
    state(
        "ThreadService.Delete",
        "thread with an active run",
        lambda e: DT(thread_id=e.active_run().thread_id),
        FP,
        ACTIVE,
    ),
    *list_cases(
        "ThreadService.List", lambda e, **f: tp.ListThreadsRequest(**f), "AssistantService.List", None
    ),
]

M = "MessageService.Create"
CM, LM = mp.CreateMessageRequest, mp.ListMessagesRequest
MESSAGES = [
    *id_cases(M, "thread_id", "thread", lambda e, i: CM(thread_id=i, text="hi")),
    *content_cases(M, lambda e, **f: CM(thread_id=e.thread.id, **f), ""),
    *label_cases(M, lambda e, labels: CM(thread_id=e.thread.id, text="hi", labels=labels)),
    *request_id_cases(M, lambda e, r: CM(thread_id=e.thread.id, text="hi", request_id=r)),
    reuse_case(M, lambda e, r, v: CM(thread_id=e.thread.id, text=v, request_id=r)),
    state(
        M,
        "thread with an active run",
        lambda e: CM(thread_id=e.active_run().thread_id, text="hi"),
        FP,
        ACTIVE,
    ),
    *id_cases("MessageService.Get", "message_id", "msg", lambda e, i: mp.GetMessageRequest(message_id=i)),
    *id_cases("MessageService.List", "thread_id", "thread", lambda e, i: mp.ListMessagesRequest(thread_id=i)),
    case(
        "MessageService.List",
        "run_id with a wrong prefix",
        lambda e: LM(thread_id=e.thread.id, run_id=e.message_id),
        IA,
        "run_id",
    ),
    *list_cases(
        "MessageService.List",
        lambda e, **f: mp.ListMessagesRequest(**{"thread_id": e.thread.id, **f}),
        "AssistantService.List",
        lambda e: {"thread_id": e.done_run.thread_id},
    ),
]


def create_run(e: Env, **fields: Any) -> rp.CreateRunRequest:
    return rp.CreateRunRequest(**{"assistant_id": e.assistant.id, "thread_id": e.thread.id, **fields})


def tool_run(e: Env, **fields: Any) -> rp.CreateRunRequest:
    """A run of the assistant with the function tool get_weather."""
    return create_run(e, assistant_id=e.tool_assistant.id, **fields)


M, CR, TC = "RunService.Create", create_run, cp.ToolChoice
CHOICE, ADDITIONAL, LONG = "tool_choice.function_name", "additional_instructions", 256_001
RUN_CREATE = [
    *id_cases(M, "assistant_id", "asst", lambda e, i: CR(e, assistant_id=i)),
    *id_cases(M, "thread_id", "thread", lambda e, i: CR(e, thread_id=i)),
    *invalid(
        M,
        ("instructions over 256000 chars", lambda e: CR(e, instructions="i" * 256_001), "instructions"),
        ("NUL in instructions", lambda e: CR(e, instructions="\x00"), "instructions"),
        ("additional_instructions too long", lambda e: CR(e, additional_instructions="i" * LONG), ADDITIONAL),
        ("model of 257 chars", lambda e: CR(e, model="m" * 257), "model"),
        ("unknown model", lambda e: CR(e, model="no-such-model"), "model"),
        ("model without a provider", lambda e: CR(e, model="/gpt"), "model"),
        ("max_prompt_tokens 0", lambda e: CR(e, max_prompt_tokens=0), "max_prompt_tokens"),
        (
            "33 additional messages",
            lambda e: CR(e, additional_messages=[MI(text="m")] * 33),
            "additional_messages",
        ),
        (
            "tool_choice naming a tool that does not exist",
            lambda e: tool_run(e, tool_choice={"function_name": "x"}),
            CHOICE,
        ),
        (
            "tool_choice naming a tool the override removed",
            lambda e: tool_run(e, override_tools=True, tool_choice=TC(function_name="get_weather")),
            CHOICE,
        ),
        (
            "tool_choice mode 9",
            lambda e: tool_run(e, tool_choice=TC(mode=TC.Mode.ValueType(9))),
            "tool_choice.mode",
        ),
        (
            "tool_choice REQUIRED without tools",
            lambda e: CR(e, tool_choice={"mode": TC.REQUIRED}),
            "tool_choice.mode",
        ),
    ),
    big_details(
        M,
        "tool_choice naming a 20000-char tool",
        lambda e: tool_run(e, tool_choice={"function_name": BIG}),
        CHOICE,
    ),
    *content_cases(M, lambda e, **f: CR(e, additional_messages=[MI(**f)]), "additional_messages[0]."),
    *tool_cases(M, lambda e, tools: CR(e, tools=tools, override_tools=True)),
    *completion_cases(M, lambda e, n, v: CR(e, **{n: v}), "", "max_completion_tokens"),
    *truncation_cases(M, lambda e, ts: CR(e, truncation_strategy=ts), "truncation_strategy"),
    *response_format_cases(M, lambda e, rf: CR(e, response_format=rf)),
    *label_cases(M, lambda e, labels: CR(e, labels=labels)),
    *label_cases(
        M,
        lambda e, labels: CR(e, additional_messages=[MI(text="m", labels=labels)]),
        "additional_messages[0].labels",
    ),
    *request_id_cases(M, lambda e, r: CR(e, request_id=r)),
    reuse_case(M, lambda e, r, v: CR(e, thread_id=e.s.thread(v).id, labels={"try": v}, request_id=r)),
    state(
        M,
        "second run on a thread with an active run",
        lambda e: CR(e, thread_id=e.active_run().thread_id),
        FP,
        ACTIVE,
    ),
    state(
        M,
        "run on a thread waiting for tool results",
        lambda e: CR(e, thread_id=e.tool_run.thread_id),
        FP,
        ACTIVE,
    ),
]


def submit(e: Env, answers: list[cp.ToolResult], run_id: str | None = None, **fields: Any) -> Any:
    """SubmitToolResults, by default to the module's TOOL_CALLS run."""
    run_id = e.tool_run.id if run_id is None else run_id
    return rp.SubmitToolResultsRequest(run_id=run_id, tool_results=answers, **fields)


def submit_first_only(run: rp.Run) -> rp.SubmitToolResultsRequest:
    first = run.required_tool_calls[0].id
    return rp.SubmitToolResultsRequest(run_id=run.id, tool_results=results((first, "x")))


def resubmit(e: Env, output: str | None, request_id: str) -> rp.SubmitToolResultsRequest:
    """The done run's own answers again (a no-op), or with another output."""
    answers = e.done_results if output is None else results((e.done_results[0].tool_call_id, output))
    return submit(e, answers, run_id=e.done_run.id, request_id=request_id)


def wait(run_id: str, seconds: int = 0, nanos: int = 0) -> rp.WaitRunRequest:
    return rp.WaitRunRequest(run_id=run_id, timeout=Duration(seconds=seconds, nanos=nanos))


def listen(e: Env, start: int) -> rp.ListenRunRequest:
    return rp.ListenRunRequest(run_id=e.done_run.id, events_start_idx=start)


M = "RunService.SubmitToolResults"
LR, UR, CN = rp.ListRunsRequest, rp.UpdateRunRequest, rp.CancelRunRequest
BIG_ID, UNKNOWN_CALL = BIG, "tool_results.tool_call_id"
RUN_OTHER = [
    *id_cases("RunService.Get", "run_id", "run", lambda e, i: rp.GetRunRequest(run_id=i)),
    *id_cases(
        "RunService.GetLastByThread",
        "thread_id",
        "thread",
        lambda e, i: rp.GetLastRunByThreadRequest(thread_id=i),
    ),
    state(
        "RunService.GetLastByThread",
        "thread without runs",
        lambda e: rp.GetLastRunByThreadRequest(thread_id=e.thread.id),
        NF,
        "RUN_NOT_FOUND",
    ),
    *invalid(
        "RunService.List",
        ("thread_id filter with a wrong prefix", lambda e: LR(thread_id=UNKNOWN["asst"]), "thread_id"),
        (
            "assistant_id filter with a wrong prefix",
            lambda e: LR(assistant_id=UNKNOWN["run"]),
            "assistant_id",
        ),
        ("statuses [42]", lambda e: LR(statuses=[rp.RunStatus.ValueType(42)]), "statuses[0]"),
        ("statuses [UNSPECIFIED]", lambda e: LR(statuses=[rp.RUN_STATUS_UNSPECIFIED]), "statuses[0]"),
        (
            "statuses [COMPLETED, -1]",
            lambda e: LR(statuses=[rp.COMPLETED, rp.RunStatus.ValueType(-1)]),
            "statuses[1]",
        ),
    ),
    big_details(
        "RunService.List",
        "1000 bad statuses",
        lambda e: LR(statuses=[rp.RunStatus.ValueType(42)] * 1000),
        "statuses[0]",
    ),
    *label_cases("RunService.List", lambda e, labels: LR(labels=labels)),
    *list_cases(
        "RunService.List",
        lambda e, **f: LR(**f),
        "AssistantService.List",
        lambda e: {"statuses": [rp.COMPLETED]},
    ),
    *id_cases("RunService.Update", "run_id", "run", lambda e, i: UR(run_id=i, labels={"a": "b"})),
    *invalid(
        "RunService.Update",
        *(
            (
                f"update_mask {p}",
                lambda e, p=p: UR(run_id=e.done_run.id, update_mask=FieldMask(paths=p)),
                "update_mask",
            )
            for p in (["status"], ["labels", "model"], ["labels.k"])
        ),
        (
            "NUL in a label value",
            lambda e: UR(run_id=e.done_run.id, labels={"k": "\x00"}),
            "labels['k']",
        ),
    ),
    *label_cases("RunService.Update", lambda e, labels: UR(run_id=e.done_run.id, labels=labels)),
    *request_id_cases("RunService.Update", lambda e, r: UR(run_id=e.done_run.id, request_id=r)),
    reuse_case(
        "RunService.Update", lambda e, r, v: UR(run_id=e.done_run.id, labels={"try": v}, request_id=r)
    ),
    *id_cases("RunService.Cancel", "run_id", "run", lambda e, i: CN(run_id=i)),
    *request_id_cases("RunService.Cancel", lambda e, r: CN(run_id=e.done_run.id, request_id=r)),
    reuse_case(
        "RunService.Cancel",
        lambda e, r, v: CN(run_id=e.done_run.id if v == "1" else UNKNOWN["run"], request_id=r),
    ),
    *id_cases(M, "run_id", "run", lambda e, i: submit(e, results(("call_1", "x")), run_id=i)),
    *invalid(
        M,
        ("no results", lambda e: submit(e, []), "tool_results"),
        ("empty tool_call_id", lambda e: submit(e, results(("", "x"))), "tool_results[0].tool_call_id"),
        (
            "duplicate tool_call_id",
            lambda e: submit(e, results((e.call_id, "a"), (e.call_id, "b"))),
            "tool_results[1].tool_call_id",
        ),
        (
            "129 results",
            lambda e: submit(e, results(*((f"call_{i}", "x") for i in range(129)))),
            "tool_results",
        ),
        ("NUL in output", lambda e: submit(e, results((e.call_id, "\x00"))), "tool_results[0].output"),
        (
            "output over 512000 chars",
            lambda e: submit(e, results((e.call_id, "o" * 512_001))),
            "tool_results[0].output",
        ),
    ),
    case(
        M,
        "unknown tool_call_id",
        lambda e: submit(e, results(("call_no", "x"))),
        IA,
        UNKNOWN_CALL,
        reason=UNKNOWN_ID,
    ),
    case(
        M,
        "unknown tool_call_id beside the right one",
        lambda e: submit(e, results((e.call_id, "x"), ("call_no", "y"))),
        IA,
        UNKNOWN_CALL,
        reason=UNKNOWN_ID,
    ),
    big_details(
        M, "unknown tool_call_id of 20000 chars", lambda e: submit(e, results((BIG_ID, "x"))), UNKNOWN_CALL
    ),
    big_details(
        M,
        "duplicate tool_call_id of 20000 chars",
        lambda e: submit(e, results((BIG_ID, "x"), (BIG_ID, "y"))),
        "tool_results[1].tool_call_id",
    ),
    state(
        M,
        "results missing for a call",
        lambda e: submit_first_only(e.two_call_run()),
        FP,
        "TOOL_RESULTS_MISSING",
    ),
    state(
        M,
        "completed run",
        lambda e: submit(e, results(("call_x", "x")), run_id=e.done_run.id),
        FP,
        NOT_WAITING,
    ),
    state(
        M,
        "run not waiting for tools",
        lambda e: submit(e, results(("call_x", "x")), run_id=e.active_run().id),
        FP,
        NOT_WAITING,
    ),
    *request_id_cases(M, lambda e, r: resubmit(e, None, r)),
    reuse_case(M, lambda e, r, v: resubmit(e, None if v == "1" else "another output", r)),
    *id_cases("RunService.Wait", "run_id", "run", lambda e, i: wait(i, 1)),
    *invalid(
        "RunService.Wait",
        ("timeout -1 s", lambda e: wait(e.done_run.id, -1), "timeout"),
        ("timeout -1 ns", lambda e: wait(e.done_run.id, 0, -1), "timeout"),
        ("timeout 601 s", lambda e: wait(e.done_run.id, 601), "timeout"),
        ("timeout 10**11 s", lambda e: wait(e.done_run.id, 10**11), "timeout"),
    ),
    *id_cases("RunService.ListSteps", "run_id", "run", lambda e, i: rp.ListRunStepsRequest(run_id=i)),
    *list_cases(
        "RunService.ListSteps",
        lambda e, **f: rp.ListRunStepsRequest(**{"run_id": e.done_run.id, **f}),
        "AssistantService.List",
        lambda e: {"run_id": e.tool_run.id},
    ),
    *id_cases("RunService.Listen", "run_id", "run", lambda e, i: rp.ListenRunRequest(run_id=i)),
    *invalid(
        "RunService.Listen",
        ("events_start_idx -1", lambda e: listen(e, -1), "events_start_idx"),
        ("events_start_idx -2**63", lambda e: listen(e, -(2**63)), "events_start_idx"),
    ),
    too_big(
        "RunService.Listen",
        "request over the 8 MiB limit",
        lambda e: rp.ListenRunRequest(run_id="run_" + "x" * (9 << 20)),
    ),
]

CASES = [*ASSISTANT_CREATE, *ASSISTANT_UPDATE, *ASSISTANT_OTHER, *THREADS, *MESSAGES, *RUN_CREATE, *RUN_OTHER]


# ---- tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(stubs: Stubs) -> Iterator[Env]:
    made = Env(stubs)
    yield made
    made.cancel(made.case_runs)
    made.cancel(made.module_runs)


def check_details(error: grpc.RpcError, expected: Case) -> None:
    info, violations = error_details(error)
    assert info is not None, "no ErrorInfo in the error details"
    assert info.domain == "spindle.v1", info
    assert UPPER_SNAKE.match(info.reason), info
    if expected.reason is not None:
        assert info.reason == expected.reason, info
    if expected.code != IA:
        return
    assert violations, "INVALID_ARGUMENT without field violations"
    assert all(description for _, description in violations), violations
    fields = {field for field, _ in violations}
    if expected.exact:
        assert fields == set(expected.fields), violations
    else:
        assert set(expected.fields) <= fields, violations


@pytest.mark.parametrize("expected", CASES)
def test_bad_input(expected: Case, env: Env, stubs: Stubs) -> None:
    try:
        request = expected.build(env)
        with pytest.raises(grpc.RpcError) as caught:
            invoke(stubs, expected.method, request, expected.metadata)
        error: Any = caught.value
        OBSERVED[expected.id] = (error.code(), expected.bug is not None)
        assert error.code() == expected.code, f"{error.code()}: {error.details()}"
        if not expected.transport:
            check_details(error, expected)
    finally:
        env.cancel(env.case_runs)
        # Whatever the request did, the server answers the next one.
        stubs.assistants.List(ap.ListAssistantsRequest(page_size=1), timeout=TIMEOUT)


GARBAGE = (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08")  # no protobuf, bad length, cut varint


@pytest.mark.parametrize("method", ALL_METHODS)
def test_garbage_bytes_do_not_hurt_the_server(method: str, stubs: Stubs) -> None:
    """Bodies that do not decode as the request message get INVALID_ARGUMENT (reason
    MALFORMED_REQUEST), never a hang or a crash, and the next call works."""
    for body in GARBAGE:
        with pytest.raises(grpc.RpcError) as caught:
            invoke(stubs, method, Raw(body))
        code = caught.value.code()
        OBSERVED[f"{method}: garbage {body!r}"] = (code, False)
        assert code == IA, caught.value
        info, violations = error_details(caught.value)
        assert info is not None and info.reason == "MALFORMED_REQUEST" and violations
    stubs.assistants.List(ap.ListAssistantsRequest(page_size=1), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.channel.unary_unary(f"/spindle.v1.{method.split('.')[0]}/NoSuchMethod")(b"", timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


AUTH = [
    ((), "MISSING_API_KEY"),
    ((("authorization", "Basic c2VjcmV0"),), "MALFORMED_API_KEY"),
    ((("authorization", "Bearer"),), "MALFORMED_API_KEY"),
    ((("authorization", "Bearer wrong"),), "INVALID_API_KEY"),
    ((("authorization", "Bearer " + "k" * 4000),), "INVALID_API_KEY"),
]


def test_bad_api_keys(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server("--api-key", "secret=project")
    stubs = Stubs.connect(server.address)
    try:
        for metadata, reason in AUTH:
            with pytest.raises(grpc.RpcError) as caught:
                stubs.assistants.List(ap.ListAssistantsRequest(), timeout=TIMEOUT, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            info, _ = error_details(caught.value)
            assert info is not None and (info.reason, info.domain) == (reason, "spindle.v1"), metadata
        good = (("authorization", "Bearer secret"),)
        stubs.assistants.List(ap.ListAssistantsRequest(), timeout=TIMEOUT, metadata=good)
    finally:
        stubs.close()


def test_server_is_still_healthy(server: ServerProcess, stubs: Stubs) -> None:
    assert server.process is not None and server.process.poll() is None, "the server process died"
    reply = health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_no_case_got_internal_or_unknown() -> None:
    """Only cases marked as known server bugs may have got INTERNAL or UNKNOWN."""
    crashes = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
    assert sorted(ident for ident, (code, bug) in OBSERVED.items() if code in crashes and not bug) == []
