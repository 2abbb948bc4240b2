"""gRPC's own call limits as flags: their defaults take a burst of new Listen calls (grpc's
refuse one), 0 leaves grpc's default, and --max-concurrent-rpcs reaches the server."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from spindle.v1 import run_pb2
from spindle_server.config import parse_config
from spindle_server.server import grpc_options
from support.server import ServerProcess
from support.stubs import Stubs

MakeServer = Callable[..., ServerProcess]


def test_defaults_take_a_burst_of_listen_calls() -> None:
    options = dict(grpc_options(parse_config([])))
    assert options["grpc.server.max_pending_requests"] == 20_000
    assert options["grpc.server.max_pending_requests_hard_limit"] == 40_000
    assert options["grpc.max_concurrent_streams"] == 20_000
    assert options["grpc.server_max_unrequested_time_in_server"] == 120


def test_flags_set_the_limits_and_zero_leaves_grpcs_own() -> None:
    config = parse_config(["--grpc-max-pending-requests", "5000", "--grpc-max-concurrent-streams", "0"])
    options = dict(grpc_options(config))
    assert options["grpc.server.max_pending_requests"] == 5000
    assert options["grpc.server.max_pending_requests_hard_limit"] == 10_000
    assert "grpc.max_concurrent_streams" not in options


@pytest.mark.parametrize(
    "flag",
    [
        "--grpc-max-pending-requests",
        "--grpc-max-pending-seconds",
        "--grpc-max-concurrent-streams",
        "--max-concurrent-rpcs",
    ],
)
def test_a_negative_limit_is_a_usage_error(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config([flag, "-1"])
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


def test_max_concurrent_rpcs_refuses_calls_beyond_it(make_server: MakeServer) -> None:
    server = make_server("--max-concurrent-rpcs", "2")
    stubs = Stubs.connect(server.address)
    paused = stubs.start("/tool get_weather {}", stubs.tool_assistant())
    paused = stubs.runs.Wait(run_pb2.WaitRunRequest(run_id=paused.id), timeout=60)
    assert paused.status == run_pb2.TOOL_CALLS
    # Two Listen streams stay open on the paused run: the server's two calls in progress.
    listens = [stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=paused.id), timeout=60) for _ in range(2)]
    for listen in listens:
        assert next(listen).index == 0
    with pytest.raises(grpc.RpcError) as refused:
        stubs.runs.Get(run_pb2.GetRunRequest(run_id=paused.id), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listens[0].cancel()
    # Once the server has seen the cancel, a call fits again (bounded by the deadline below).
    deadline = time.monotonic() + 60
    while True:
        try:
            assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=paused.id), timeout=30).id == paused.id
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.05)
    listens[1].cancel()
