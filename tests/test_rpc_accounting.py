"""Every call is counted, and errors and slow calls are logged, on the unary fast path
(api/interceptor.py records into metrics.RpcStats, exported by metrics.RpcCollector)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from spindle.v1 import message_pb2
from spindle_server import metrics
from spindle_server.api.errors import ApiError
from spindle_server.api.interceptor import SLOW_CALL_SECONDS
from spindle_server.api.validation import ID_BODY, Validator, id_test, require_id
from support.faults import Holds
from support.server import ServerProcess
from support.stubs import Stubs

GET = "/spindle.v1.RunService/Get"
CREATE = "/spindle.v1.MessageService/Create"


def test_the_rpc_figures_read_as_prometheus_client_s_own_counter_and_histogram() -> None:
    """The same calls recorded by RpcStats and by prometheus_client's Counter and Histogram (what
    the server used before) give the same exposition: names, help, labels, buckets on their
    boundaries, +Inf, count and sum."""
    calls = [
        (GET, "OK", 0.0001),
        (GET, "OK", 0.0005),  # on a boundary: counted in le="0.0005", as prometheus_client does
        (GET, "NOT_FOUND", 0.003),
        (GET, "OK", 1.0),
        (CREATE, "OK", 0.02),
        (CREATE, "UNAVAILABLE", 700.0),  # beyond the last bound: +Inf only
    ]
    ours = metrics.RpcCollector()
    for method, code, seconds in calls:
        ours.stats(method).record(code, seconds)
    ours.stats("/spindle.v1.RunService/Cancel")  # registered, never called: no series
    mine = CollectorRegistry()
    mine.register(ours)

    theirs = CollectorRegistry()
    counter = Counter("spindle_rpcs", metrics._RPCS_HELP, ["method", "code"], registry=theirs)
    histogram = Histogram(
        "spindle_rpc_duration_seconds",
        metrics._RPC_SECONDS_HELP,
        ["method"],
        buckets=metrics._CALL_BUCKETS,
        registry=theirs,
    )
    for method, code, seconds in calls:
        counter.labels(method, code).inc()
        histogram.labels(method).observe(seconds)

    def lines(registry: CollectorRegistry) -> list[str]:
        return sorted(generate_latest(registry).decode().splitlines())

    assert lines(mine) == lines(theirs)


def test_a_slow_successful_call_is_logged_at_info(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """At --log-level info a successful call is only counted, unless it took SLOW_CALL_SECONDS
    or more: held at a fault point until that much time has passed since it was sent (so it
    cannot have been faster, however fast the machine), it is logged at info with its figures."""
    point = "idempotency.before_perform:messages.create"
    holds = Holds(tmp_path / "holds")
    server = make_server("--log-level", "info", env=holds.env(point))
    stubs = Stubs.connect(server.address)
    try:
        thread = stubs.thread()
        request = message_pb2.CreateMessageRequest(thread_id=thread.id, text="slow", request_id="slow-1")
        with ThreadPoolExecutor(1) as pool:
            sent = time.monotonic()
            answer = pool.submit(stubs.messages.Create, request, timeout=60)
            holds.wait_reached(point)
            time.sleep(max(0.0, SLOW_CALL_SECONDS - (time.monotonic() - sent)) + 0.05)
            holds.release(point)
            message = answer.result()
    finally:
        stubs.close()
    line = server.wait_for_log(lambda e: e.get("event") == "rpc" and e.get("method") == CREATE)
    assert line["level"] == "info" and line["code"] == "OK"
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= SLOW_CALL_SECONDS * 1000
    assert line["request_id"]
    assert message.thread_id == thread.id


@pytest.mark.parametrize(
    "value",
    [
        "run_abc",
        "run_A-b_9",
        "run_" + "x" * 124,
        "run_" + "x" * 125,
        "",
        "run_",
        "thread_abc",
        "run abc",
        "run_abc\n",
        "run_ab.c",
        "run_é",
        "RUN_abc",
        "xrun_abc",
    ],
)
def test_the_fast_id_checks_decide_as_the_rules_say(value: str) -> None:
    """require_id, Validator.resource_id and id_test (Get's bound check, before it falls back
    to require_id) accept and refuse exactly what the rules say: present, the type's prefix
    and something after it, at most 128 characters, ID_BODY's characters."""
    well_formed = (
        value.startswith("run_") and len(value) > 4 and len(value) <= 128 and bool(ID_BODY.match(value))
    )
    expected = (
        []
        if well_formed
        else [("run_id", "is required" if not value else "must be an id starting with 'run_'")]
    )
    v = Validator()
    v.resource_id("run_id", value, "run")
    assert v.violations == expected
    if id_test("run")(value):  # a match needs no further check; None goes to require_id
        assert well_formed
    try:
        require_id("run_id", value, "run")
    except ApiError as error:
        assert expected and error.violations == expected
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    else:
        assert not expected


def test_health_and_reflection_answer_without_registered_methods(server: ServerProcess) -> None:
    """No method is a grpc registered method (they cost every call CPU): health and reflection
    are still served, as generic handlers, next to the API."""
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = reflection_pb2.ServerReflectionRequest(file_containing_symbol="spindle.v1.RunService")
        (answer,) = stub.ServerReflectionInfo(iter([asked]), timeout=10)
        assert answer.file_descriptor_response.file_descriptor_proto
        listed = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = stub.ServerReflectionInfo(iter([listed]), timeout=10)
        names = {service.name for service in answer.list_services_response.service}
        assert {"spindle.v1.RunService", "grpc.health.v1.Health"} <= names
