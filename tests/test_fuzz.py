"""Fuzzing (issue 8, must-exist 3): generated and byte-mutated requests for every method of the
four services, Listen and Wait included, sent to one real server process.

Requests are built from the message descriptors, so every field of every request type is covered
and a field added to a .proto is fuzzed without a change here: strings (ids of real resources,
ids with the right or a wrong prefix, unicode, NUL, huge, the builtin model's commands, forged
page tokens), integers at their extremes, enums out of range, doubles incl. NaN and infinities,
nested messages, repeated fields (also past their limits), maps and oneofs. Each generated
request is also sent with its encoding mutated at the byte level (flipped, cut, spliced, an
unknown or ill-typed field, invalid UTF-8, a length past the end), as raw bytes through identity
serializers. Half the requests are plausible (real ids of the right kind, small numbers, valid
enums, a few other fields that may still be wrong), so they get past validation into the store
and the engine. Ids and page tokens from every answer go back into the pool, so later examples reach
runs in every state (pending right after a fuzzed Create, streaming, waiting for tools, finished).

Properties, after every call: never INTERNAL or UNKNOWN (nor any code the API does not use),
every error the server makes has an UPPER_SNAKE ErrorInfo reason, the process is alive; after
every example, health is SERVING. At the end, every run the fuzzer met obeys the invariants of
tests/support/invariants.py once the live ones are cancelled.

Reproducible: derandomized, no example database. Locally, SPINDLE_FUZZ_EXAMPLES=N raises the count
per method and SPINDLE_FUZZ_STATS=1 prints the answers by method, code and reason (with -s).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from support.invariants import assert_invariants
from support.server import Databases, ServerProcess
from support.stubs import TERMINAL, Stubs, error_details

EXAMPLES = int(os.environ.get("SPINDLE_FUZZ_EXAMPLES", "20"))
BATCH = 4  # requests per example, each sent as generated and mutated
UNARY_TIMEOUT = 30.0  # a failure bound only
FOLLOW_TIMEOUT = 0.2  # Listen and Wait: short deadlines, DEADLINE_EXCEEDED is a fine answer
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
Code = grpc.StatusCode
# Codes the API answers with (api/errors.py); RESOURCE_EXHAUSTED also comes from grpc itself for
# a request over --max-message-bytes.
ALLOWED = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS,
    Code.ABORTED,
    Code.RESOURCE_EXHAUSTED,
}
FOLLOW_METHODS = (
    "/spindle.v1.RunService/Wait",
    "/spindle.v1.RunService/Listen",
    "/spindle.v1.RunService/ListenBatches",
)
NEEDS_ERROR_INFO = ALLOWED - {Code.OK, Code.RESOURCE_EXHAUSTED}

SERVICES = [
    module.DESCRIPTOR.services_by_name[name]
    for module, name in (
        (assistant_pb2, "AssistantService"),
        (thread_pb2, "ThreadService"),
        (message_pb2, "MessageService"),
        (run_pb2, "RunService"),
    )
]
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}

PREFIXES = ("asst", "thread", "msg", "run", "step", "call")
SCRIPTS = (
    "hello",
    "/tool get_weather {}",
    '/tool get_weather {"city": "Paris"}\n/tool lookup {"q": 1}',
    "/tool nope not json",
    '/tool get_weather {"city": "Paris"}\n/sleep 0.05',
    "/sleep 0.05 slow",
    "/sleep 3600 stuck",
    "/sleep 1e308",
    "/fail boom",
    "/fail",
)
SPECIAL = ("", " ", "\x00", "a\x00b", "labels", "name", "*", "tools", "x" * 64, "\u202e\ufeff", "😀" * 3)
INT_BOUNDS = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
MAX_DEPTH = 4


# ---- the server and the pool of real values --------------------------------------------------


@dataclass
class Target:
    server: ServerProcess
    stubs: Stubs
    health: health_pb2_grpc.HealthStub
    pool: list[str] = field(default_factory=list)  # real ids, tool call ids and page tokens
    run_ids: set[str] = field(default_factory=set)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # shown with SPINDLE_FUZZ_STATS

    def remember(self, value: str) -> None:
        if value and value not in self.pool:
            self.pool.append(value)
            if value.startswith("run_"):
                self.run_ids.add(value)
            del self.pool[64:-256]  # keep the seeds and the newest


def _type_of(fd: FieldDescriptor) -> Descriptor:
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


def _enum_numbers(fd: FieldDescriptor) -> list[int]:
    assert fd.enum_type is not None, fd.full_name
    return [value.number for value in fd.enum_type.values]


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and _type_of(fd).GetOptions().map_entry


def _harvest(target: Target, message: Message, depth: int = 0) -> None:
    """Ids, tool call ids and page tokens of an answer, to use in later requests."""
    for descriptor, value in message.ListFields():
        if descriptor.cpp_type == FieldDescriptor.CPPTYPE_STRING and (
            descriptor.name in ("id", "next_page_token", "tool_call_id") or descriptor.name.endswith("_id")
        ):
            target.remember(str(value))
        elif descriptor.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and depth < 3:
            if _is_map(descriptor):
                continue
            items = value if descriptor.is_repeated else [value]
            for item in list(items)[:20]:
                _harvest(target, item, depth + 1)


def _seed(target: Target) -> None:
    """Resources in every state: runs completed, failed, cancelled, incomplete, streaming (for an
    hour) and waiting for tool results; listings with a next page."""
    stubs = target.stubs
    echo = stubs.assistant(name="echo")
    tools = stubs.tool_assistant("get_weather", "lookup")
    schema = common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.JSON_OBJECT)
    shaped = stubs.assistant(name="shaped", instructions="be brief", response_format=schema)
    runs = [
        stubs.start("hello there", echo),
        stubs.start("/fail boom", echo),
        stubs.start("a b c d e f g h", echo, max_completion_tokens=2),
        stubs.start("/sleep 3600 streaming for an hour", echo),
        stubs.start("/sleep 3600 to cancel", shaped),
        stubs.start('/tool get_weather {"city": "Paris"}', tools),
        stubs.start('/tool get_weather {"city": "Paris"}\n/tool lookup {"q": "x"}', tools),
        # More waiting for tools: fuzzed Cancels and SubmitToolResults end some of them early.
        *(stubs.start(f'/tool lookup {{"q": {n}}}', tools) for n in range(4)),
    ]
    for run in runs:
        target.remember(run.id)
        target.remember(run.thread_id)
        target.remember(run.assistant_id)
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=runs[4].id), timeout=10)
    for run in runs:
        stubs.wait_for(run.id, TERMINAL | {run_pb2.TOOL_CALLS, run_pb2.IN_PROGRESS})
        settled = stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id), timeout=10)
        _harvest(target, settled)
        steps = stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id), timeout=10)
        _harvest(target, steps)
    for stub, request in (
        (stubs.assistants.List, assistant_pb2.ListAssistantsRequest(page_size=1)),
        (stubs.threads.List, thread_pb2.ListThreadsRequest(page_size=1)),
        (stubs.runs.List, run_pb2.ListRunsRequest(page_size=1)),
        (stubs.messages.List, message_pb2.ListMessagesRequest(thread_id=runs[0].thread_id, page_size=1)),
    ):
        _harvest(target, stub(request, timeout=10))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, databases: Databases) -> Iterator[Target]:
    database = databases.new(tmp_path_factory.mktemp("fuzz"))
    server = ServerProcess(database, ["--tool-timeout", "600", "--grace-period", "1"]).start()
    stubs = Stubs.connect(server.address)
    made = Target(server, stubs, health_pb2_grpc.HealthStub(stubs.channel))
    try:
        _seed(made)
        yield made
        if os.environ.get("SPINDLE_FUZZ_STATS"):
            for (method, code), count in sorted(made.outcomes.items()):
                print(f"{method:40} {code:22} {count}")
            for line in server.log_events():
                if line.get("level") not in ("debug", "info"):
                    print(line)
    finally:
        stubs.close()
        server.kill()


# ---- generating requests from descriptors -----------------------------------------------------


def _pick(target: Target) -> st.SearchStrategy[str]:
    return st.integers(0, 10**6).map(lambda i: target.pool[i % len(target.pool)] if target.pool else "")


def _forged_token() -> st.SearchStrategy[str]:
    scalars = st.one_of(
        st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5), st.booleans(), st.none()
    )
    body = st.one_of(
        st.dictionaries(st.sampled_from(["s", "d", "f", "x"]), scalars, max_size=4),
        st.lists(scalars, max_size=3),
        scalars,
    )
    return body.map(lambda value: base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("="))


def _strings(target: Target) -> st.SearchStrategy[str]:
    text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
    huge = st.builds(
        lambda char, n: char * n,
        st.sampled_from(["x", "é", "😀", "\x00", " "]),
        st.sampled_from([65, 129, 257, 513, 1025, 256_001, 600_000]),
    )
    prefixed = st.builds(lambda p, body: f"{p}_{body}", st.sampled_from(PREFIXES), text)
    real = _pick(target)
    return st.one_of(
        real,
        real,
        real.map(lambda value: value[:-1]),  # a real id, one character short
        real.map(lambda value: value.split("_", 1)[-1]),  # without its prefix
        prefixed,
        st.sampled_from(SCRIPTS),
        st.sampled_from(SPECIAL),
        _forged_token(),
        text,
        huge,
        huge,
    )


ID_PREFIX = {"assistant_id": "asst", "thread_id": "thread", "message_id": "msg", "run_id": "run"}
NEEDED = {*ID_PREFIX, "tool_results", "tool_call_id", "text"}  # always set in plausible requests


def _real(target: Target, prefix: str) -> st.SearchStrategy[str]:
    def choose(index: int) -> str:
        matching = [value for value in target.pool if value.startswith(prefix)]
        return matching[index % len(matching)] if matching else f"{prefix}{'0' * 24}"

    return st.integers(0, 10**6).map(choose)


def _plausible_string(fd: FieldDescriptor, target: Target) -> st.SearchStrategy[str]:
    """What a well-meaning client sends: a real id of the right kind, a short name, a script."""
    if fd.name in ID_PREFIX:
        return _real(target, ID_PREFIX[fd.name] + "_")
    if fd.name == "tool_call_id":
        return _real(target, "call_")
    if fd.name == "page_token":
        return st.one_of(st.just(""), _real(target, "ey"))
    if fd.name == "request_id":
        # Mostly new ones; a reused one answers the first request's response, or REQUEST_ID_REUSED.
        return st.one_of(st.just(""), st.uuids().map(str), st.uuids().map(str), st.sampled_from(["r1", "r2"]))
    if fd.name in ("model",):
        return st.sampled_from(["", "builtin", "nope/model"])
    if fd.name in ("paths", "function_name", "name"):
        return st.sampled_from(["get_weather", "lookup", "labels", "name", "description", "x"])
    return st.one_of(st.sampled_from(SCRIPTS), st.text(st.characters(codec="ascii"), max_size=12))


def _scalar(fd: FieldDescriptor, target: Target, plausible: bool = False) -> st.SearchStrategy[Any]:
    cpp = fd.cpp_type
    if plausible:
        if cpp == FieldDescriptor.CPPTYPE_STRING and fd.type != FieldDescriptor.TYPE_BYTES:
            return _plausible_string(fd, target)
        if cpp in INT_BOUNDS:
            return st.integers(1, 12)
        if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
            return st.floats(0.0, 1.0)
        if cpp == FieldDescriptor.CPPTYPE_ENUM:
            return st.sampled_from(_enum_numbers(fd))
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if fd.type == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64)
        return _strings(target)
    if cpp in INT_BOUNDS:
        low, high = INT_BOUNDS[cpp]
        edges = [low, high, 0, 1, -1, 2, 16, 17, 32, 33, 100, 101, 128, 129, 600, 601]
        return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high))
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, 2.0000001, -1.0, 1e308]), st.floats())
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        numbers = _enum_numbers(fd)
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for {fd.full_name}")


def _deep_struct(depth: int) -> struct_pb2.Struct:
    """A Struct nested `depth` levels: near and past protobuf's recursion limit (100)."""
    root = struct_pb2.Struct()
    current = root
    for _ in range(depth):
        current = current.fields["a"].struct_value
    current.fields["leaf"].string_value = "x"
    return root


@st.composite
def messages(
    draw: st.DrawFn, descriptor: Descriptor, target: Target, depth: int = 0, plausible: bool = False
) -> Message:
    """Any message of this type; `plausible` ones hold sensible values (real ids, small numbers,
    valid enums), so they get past validation into the store and the engine."""
    message = message_factory.GetMessageClass(descriptor)()
    plain = not plausible and descriptor.full_name == "google.protobuf.Struct"
    if plain and draw(st.integers(0, 9)) == 0:
        message.CopyFrom(_deep_struct(draw(st.sampled_from([40, 98, 150]))))
        return message
    if depth >= MAX_DEPTH:
        return message
    # Each field is set or not; setting a member of a oneof clears its siblings, so the drawn
    # order decides which member wins.
    for fd in draw(st.permutations(list(descriptor.fields))):
        if plausible:  # the ids a call needs, and a few other fields (each one may be wrong)
            if fd.name not in NEEDED and draw(st.integers(0, 2)) != 0:
                continue
        elif not draw(st.booleans()):
            continue
        # A value the Python API refuses to hold cannot be sent either: leave the field unset.
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            _set(draw, message, fd, target, depth, plausible)
    return message


def _set(
    draw: st.DrawFn, message: Message, fd: FieldDescriptor, target: Target, depth: int, plausible: bool
) -> None:
    container = getattr(message, fd.name)
    is_message = fd.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE

    def value(of: FieldDescriptor) -> Any:
        if of.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            return draw(messages(_type_of(of), target, depth + 1, plausible))
        return draw(_scalar(of, target, plausible))

    if _is_map(fd):
        key_fd, value_fd = _type_of(fd).fields_by_name["key"], _type_of(fd).fields_by_name["value"]
        size = draw(st.sampled_from([0, 1, 2] if plausible else [0, 1, 2, 3, 17]))
        for index in range(size):
            key = draw(_scalar(key_fd, target, plausible)) if size < 17 else f"k{index}"
            if value_fd.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                container[key].CopyFrom(value(value_fd))
            else:
                container[key] = value(value_fd)
        return
    if fd.is_repeated:
        size = draw(st.sampled_from([0, 1, 2] if plausible else [0, 1, 2, 3, 33, 129]))
        distinct = min(size, 3)  # past three, repeat the drawn elements: cheap, still over limits
        elements = [value(fd) for _ in range(distinct)]
        if is_message:
            for index in range(size):
                container.add().CopyFrom(elements[index % distinct])
        else:
            container.extend(elements[index % distinct] for index in range(size))
        return
    if is_message:
        container.CopyFrom(value(fd))
    else:
        setattr(message, fd.name, value(fd))


# ---- byte-level mutations ----------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    # Positions are drawn independent of the length and taken modulo it: the bytes differ from
    # one replay to the next (the ids in them are new), the choices must not.
    buffer = bytearray(data)

    def position() -> int:
        return draw(st.integers(0, 2**16)) % (len(buffer) + 1)

    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 7))
        at = position()
        if kind == 0:  # overwrite one byte
            buffer[at : at + 1] = bytes([draw(st.integers(0, 255))])
        elif kind == 1:  # insert noise
            buffer[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == 2:  # cut
            del buffer[at : at + draw(st.integers(1, 16))]
        elif kind == 3:  # truncate
            del buffer[at:]
        elif kind == 4:  # splice a copy of a slice elsewhere
            piece = bytes(buffer[at : at + draw(st.integers(1, 32))])
            where = position()
            buffer[where:where] = piece
        elif kind == 5:  # a field of any number and wire type (also unknown, reserved or broken)
            number = draw(st.sampled_from([1, 2, 3, 4, 5, 15, 16, 18, 19, 2**29 - 1]))
            wire = draw(st.integers(0, 7))
            buffer += _varint(number << 3 | wire) + draw(st.binary(max_size=10))
        elif kind == 6:  # invalid UTF-8 in a string field
            number = draw(st.integers(1, 18))
            payload = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"run_\x80"]))
            buffer += _varint(number << 3 | 2) + _varint(len(payload)) + payload
        else:  # a length far past the end
            buffer += _varint(draw(st.integers(1, 18)) << 3 | 2) + _varint(2**31 - 1)
    return bytes(buffer)


# ---- sending and checking ------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    error: grpc.RpcError | None
    answers: list[bytes]


def _send(target: Target, path: str, body: bytes) -> Outcome:
    channel = target.stubs.channel
    method = METHODS[path]
    follow = path in FOLLOW_METHODS
    timeout = FOLLOW_TIMEOUT if follow else UNARY_TIMEOUT
    try:
        if method.server_streaming:
            call = channel.unary_stream(path)(body, timeout=timeout)
            answers = list(call)
        else:
            answers = [channel.unary_unary(path)(body, timeout=timeout)]
    except grpc.RpcError as error:
        code = error.code()
        if follow and code == Code.DEADLINE_EXCEEDED:
            return Outcome(Code.OK, None, [])
        return Outcome(code, error, [])
    return Outcome(Code.OK, None, answers)


def _check(target: Target, path: str, body: bytes, outcome: Outcome) -> None:
    method: MethodDescriptor = METHODS[path]
    reason = error_details(outcome.error)[0] if outcome.error is not None else None
    target.outcomes[(path.rsplit(".", 1)[-1], f"{outcome.code.name} {reason.reason if reason else ''}")] += 1
    shown = f"{path} with {len(body)} bytes {body[:200]!r}"
    assert target.server.process is not None and target.server.process.poll() is None, (
        f"the server died after {shown}:\n{''.join(target.server.stderr_lines)[-4000:]}"
    )
    error = outcome.error
    assert outcome.code in ALLOWED, f"{outcome.code} ({error and error.details()}) for {shown}"
    if error is not None and outcome.code in NEEDS_ERROR_INFO:
        info, _ = error_details(error)
        assert info is not None, f"{outcome.code} without ErrorInfo for {shown}"
        assert UPPER_SNAKE.match(info.reason), f"reason {info.reason!r} for {shown}"
    response_class = message_factory.GetMessageClass(method.output_type)
    for answer in outcome.answers[:50]:
        _harvest(target, response_class.FromString(answer))


def _assert_serving(target: Target) -> None:
    answer = target.health.Check(health_pb2.HealthCheckRequest(), timeout=UNARY_TIMEOUT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _fuzz_settings(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )


# The module-scoped server outlives each example on purpose: state builds up as in production.
@pytest.mark.parametrize("path", sorted(METHODS))
def test_fuzzed_requests_never_break_the_server(target: Target, path: str) -> None:
    input_type = METHODS[path].input_type

    @_fuzz_settings(EXAMPLES)
    @given(data=st.data())
    def example(data: st.DataObject) -> None:
        # A batch of calls per example: more requests for the same generation cost.
        for _ in range(data.draw(st.integers(1, BATCH), label="calls")):
            plausible = data.draw(st.booleans(), label="plausible")
            request = data.draw(messages(input_type, target, plausible=plausible), label="request")
            body = request.SerializeToString()
            _check(target, path, body, _send(target, path, body))
            raw = data.draw(mutated(body), label="mutated bytes")
            _check(target, path, raw, _send(target, path, raw))
        _assert_serving(target)

    example()


def test_runs_met_by_the_fuzzer_hold_the_invariants(target: Target) -> None:
    """Runs created, cancelled and answered by fuzzed calls: none stuck, none half-written."""
    stubs = target.stubs
    assert target.run_ids
    existing = []
    for run_id in sorted(target.run_ids):
        try:
            run = stubs.runs.Get(run_pb2.GetRunRequest(run_id=run_id), timeout=UNARY_TIMEOUT)
        except grpc.RpcError as error:
            assert error.code() in (Code.NOT_FOUND, Code.INVALID_ARGUMENT), error
            continue  # a forged id, or its thread was deleted by a fuzzed call
        existing.append(run.id)
        if run.status not in TERMINAL | {run_pb2.TOOL_CALLS}:
            stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=UNARY_TIMEOUT)
    assert_invariants(stubs, existing, bound=60.0)
    _assert_serving(target)
