"""A request over --max-message-bytes gets RESOURCE_EXHAUSTED with ErrorInfo reason
MESSAGE_TOO_LARGE and both sizes, unary and streaming alike; grpc's own hard limit sits above
ours and still refuses anything far larger, and the server goes on answering."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from spindle.v1 import assistant_pb2, run_pb2
from support.server import ServerProcess
from support.stubs import Stubs, error_details

LIMIT = 64 * 1024


@pytest.fixture
def small(make_server: Callable[..., ServerProcess]) -> Stubs:
    return Stubs.connect(make_server("--max-message-bytes", str(LIMIT)).address)


def too_large(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    return error


def quota_failure(error: grpc.RpcError) -> error_details_pb2.QuotaFailure | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                    quota = error_details_pb2.QuotaFailure()
                    detail.Unpack(quota)
                    return quota
    return None


def assert_message_too_large(error: grpc.RpcError, limit: int) -> None:
    info, _ = error_details(error)
    assert info is not None and info.reason == "MESSAGE_TOO_LARGE" and info.domain == "spindle.v1"
    assert info.metadata["limit_bytes"] == str(limit) and int(info.metadata["size_bytes"]) > limit
    assert f"at most {limit}" in error.details()
    quota = quota_failure(error)
    assert quota is not None and [v.subject for v in quota.violations] == ["request"]
    assert str(limit) in quota.violations[0].description


def test_a_unary_request_over_the_limit_names_the_reason(small: Stubs) -> None:
    request = assistant_pb2.CreateAssistantRequest(instructions="i" * (LIMIT + 10))

    assert_message_too_large(too_large(lambda: small.assistants.Create(request, timeout=30)), LIMIT)
    fits = assistant_pb2.CreateAssistantRequest(instructions="i" * (LIMIT - 100))
    assert small.assistants.Create(fits, timeout=30).id  # just under the limit: accepted


def test_a_streaming_request_over_the_limit_names_the_reason(small: Stubs) -> None:
    request = run_pb2.ListenRunRequest(run_id="run_" + "x" * (LIMIT + 10))

    error = too_large(lambda: list(small.runs.Listen(request, timeout=30)))

    assert_message_too_large(error, LIMIT)


def test_far_beyond_the_limit_grpc_refuses_and_the_server_goes_on(small: Stubs) -> None:
    request = assistant_pb2.CreateAssistantRequest(instructions="i" * (4 << 20))

    error = too_large(lambda: small.assistants.Create(request, timeout=30))

    assert error_details(error)[0] is None  # grpc's own answer: its hard limit protects the server
    assert small.assistants.List(assistant_pb2.ListAssistantsRequest(page_size=1), timeout=30) is not None


def test_the_default_8_mib_limit_names_the_reason(stubs: Stubs) -> None:
    request = assistant_pb2.CreateAssistantRequest(instructions="i" * (9 << 20))

    assert_message_too_large(too_large(lambda: stubs.assistants.Create(request, timeout=60)), 8 << 20)
