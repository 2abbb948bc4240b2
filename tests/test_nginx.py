"""nginx (deploy/nginx/spindle.conf, rendered by scripts/nginx_conf.py) in front of three replicas.

Each replica has a database of its own here, so the calls that spread over them are ones whose
answer does not depend on shared state; a run is made on one replica directly and followed
through nginx. When replicas share one database, pass it as the `database` of `replicas`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import assistant_pb2, common_pb2, run_pb2
from support.invariants import is_terminal
from support.nginx import NginxProcess, nginx_binary
from support.replicas import calls, calls_per_replica, own_sqlite, replicas
from support.server import ServerProcess
from support.stubs import Stubs, error_details

NGINX = nginx_binary()
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)"
)

CREATE = "/spindle.v1.AssistantService/Create"
EventType = run_pb2.StreamEvent


@contextlib.contextmanager
def behind_nginx(directory: Path) -> Iterator[tuple[list[ServerProcess], NginxProcess, Stubs]]:
    """Three replicas, nginx in front, and plain generated stubs on a channel to nginx (no
    client-side retry or balancing)."""
    assert NGINX is not None
    with replicas(own_sqlite(directory), extra_args=["--tool-timeout", "600"]) as servers:
        nginx = NginxProcess(NGINX, directory / "nginx", [server.address for server in servers]).start()
        stubs = Stubs.connect(nginx.address)
        try:
            yield servers, nginx, stubs
        finally:
            stubs.close()
            nginx.stop()


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[ServerProcess], NginxProcess, Stubs]]:
    """Shared by the tests that leave every replica running."""
    with behind_nginx(tmp_path_factory.mktemp("nginx")) as started:
        yield started


@pytest.fixture
def servers(setup: tuple[list[ServerProcess], NginxProcess, Stubs]) -> list[ServerProcess]:
    return setup[0]


@pytest.fixture
def nginx(setup: tuple[list[ServerProcess], NginxProcess, Stubs]) -> NginxProcess:
    return setup[1]


@pytest.fixture
def through(setup: tuple[list[ServerProcess], NginxProcess, Stubs]) -> Stubs:
    return setup[2]


def test_health_through_nginx(nginx: NginxProcess) -> None:
    with grpc.insecure_channel(nginx.address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_unary_calls_spread_over_the_replicas(
    through: Stubs, servers: list[ServerProcess], nginx: NginxProcess
) -> None:
    before = [calls(server, CREATE) for server in servers]
    made = [through.assistant(name=f"a{i}") for i in range(30)]
    assert len({assistant.id for assistant in made}) == 30
    counts = [
        n - b for n, b in zip(calls_per_replica(servers, CREATE, sum(before) + 30), before, strict=True)
    ]
    assert sum(counts) == 30
    assert all(count >= 5 for count in counts), counts  # nginx's round robin: 10 each
    # nginx's own log names the replica of each call and the gRPC status from its trailers.
    assert nginx.logged(f'{CREATE} HTTP/2.0" 200 grpc-status=0 ', 30) >= 30


def test_a_replica_down_is_skipped(tmp_path: Path) -> None:
    with behind_nginx(tmp_path) as (servers, nginx, through):
        for i in range(3):
            through.assistant(name=f"warm{i}")  # nginx now holds a connection to each replica
        assert calls_per_replica(servers, CREATE, 3) == [1, 1, 1]
        servers[1].kill()
        # No retry on this side: nginx passes each call that meets the dead replica to the next.
        for i in range(20):
            through.assistant(name=f"after{i}")
        counts = calls_per_replica([servers[0], servers[2]], CREATE, 22)
        assert sum(counts) == 22 and min(counts) > 1, counts
        # Round robin came to the dead replica among the first three: nginx's log shows that call
        # passed on to the next one ("upstream=DEAD, NEXT").
        assert nginx.logged(f"upstream={servers[1].address}, ", 1) >= 1


def listen_through(through: Stubs, run_id: str, attempts: int = 6) -> Iterator[run_pb2.StreamEvent]:
    """Listen through nginx. With a database per replica only one of them knows the run: the
    others answer NOT_FOUND, and nginx's round robin reaches the right one within three calls."""
    for _ in range(attempts):
        stream = through.runs.Listen(run_pb2.ListenRunRequest(run_id=run_id), timeout=60)
        try:
            first = next(stream)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            continue
        yield first
        yield from stream
        return
    raise AssertionError("no replica behind nginx knew the run")


def test_listen_stream_through_nginx_delivers_the_whole_run(
    through: Stubs, servers: list[ServerProcess]
) -> None:
    direct = Stubs.connect(servers[0].address)
    try:
        assistant = direct.tool_assistant("lookup")
        run = direct.run(assistant.id, direct.thread("/tool lookup {}").id)
        received: list[run_pb2.StreamEvent] = []
        for event in listen_through(through, run.id):
            received.append(event)
            if event.type == EventType.TOOL_CALLS:
                # The stream through nginx stays open while the run waits; the rest arrives live.
                call_id = event.tool_calls.tool_calls[0].id
                direct.runs.SubmitToolResults(
                    run_pb2.SubmitToolResultsRequest(
                        run_id=run.id, tool_results=[common_pb2.ToolResult(tool_call_id=call_id, output="42")]
                    ),
                    timeout=10,
                )
        assert [e.index for e in received] == list(range(len(received)))
        assert [i for i, e in enumerate(received) if is_terminal(e)][-1:] == [len(received) - 1]
        assert received[-1].type == EventType.DONE
        kinds = [e.type for e in received]
        assert EventType.TOOL_CALLS in kinds
        # Byte for byte what the replica itself delivers.
        assert [e.SerializeToString() for e in received] == [
            e.SerializeToString() for e in direct.events(run.id)
        ]
    finally:
        direct.close()


def test_error_status_and_details_pass_through_intact(through: Stubs, servers: list[ServerProcess]) -> None:
    bad = assistant_pb2.CreateAssistantRequest(name="x" * 10_000, labels={"": "no key"})
    direct = Stubs.connect(servers[0].address)
    try:
        with pytest.raises(grpc.RpcError) as at_replica:
            direct.assistants.Create(bad, timeout=10)
    finally:
        direct.close()
    with pytest.raises(grpc.RpcError) as at_nginx:
        through.assistants.Create(bad, timeout=10)
    assert at_nginx.value.code() == at_replica.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert at_nginx.value.details() == at_replica.value.details()
    info, violations = error_details(at_nginx.value)
    assert info is not None and info.reason and len(violations) >= 1
    assert (info, violations) == error_details(at_replica.value)

    def details_bin(error: grpc.RpcError) -> list[bytes]:
        return [v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"]

    assert details_bin(at_nginx.value) == details_bin(at_replica.value) != []
