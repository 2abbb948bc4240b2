"""nginx (deploy/nginx/spindle.conf, rendered by scripts/nginx_conf.py) in front of three replicas.

On the SQLite pass each replica has a file of its own, so the calls that spread over them are
ones whose answer does not depend on shared state, and a run is followed through nginx from the
one replica that knows it. On the PostgreSQL pass the three share one database, and the tests at
the end prove what only that allows: one run's calls answered by different replicas (read from
their access logs), a Listen through nginx following a run that another replica executes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import assistant_pb2, common_pb2, run_pb2, thread_pb2
from support.faults import Holds
from support.invariants import History, assert_invariants, is_terminal
from support.nginx import NginxProcess, nginx_binary
from support.replicas import (
    calls,
    calls_per_replica,
    for_store_under_test,
    replicas,
    served_counts,
    shared,
    who_served,
)
from support.server import Databases, ServerProcess, TestDatabase, store_under_test
from support.stubs import Stubs, error_details

NGINX = nginx_binary()
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)"
)

STORE = store_under_test()
CREATE = "/spindle.v1.AssistantService/Create"
GET_ASSISTANT = "/spindle.v1.AssistantService/Get"
LISTEN = "/spindle.v1.RunService/Listen"
SUBMIT = "/spindle.v1.RunService/SubmitToolResults"
GET_RUN = "/spindle.v1.RunService/Get"
EventType = run_pb2.StreamEvent
ReplicaDatabase = Callable[[int], TestDatabase | Path]
shared_only = pytest.mark.skipif(STORE != "postgresql", reason="replicas share a database on PostgreSQL")


@contextlib.contextmanager
def behind_nginx(
    directory: Path, database: ReplicaDatabase, env: Callable[[int], dict[str, str]] | None = None
) -> Iterator[tuple[list[ServerProcess], NginxProcess, Stubs]]:
    """Three replicas, nginx in front, and plain generated stubs on a channel to nginx (no
    client-side retry or balancing)."""
    assert NGINX is not None
    with replicas(database, extra_args=["--tool-timeout", "600"], env=env) as servers:
        nginx = NginxProcess(NGINX, directory / "nginx", [server.address for server in servers]).start()
        stubs = Stubs.connect(nginx.address)
        try:
            yield servers, nginx, stubs
        finally:
            stubs.close()
            nginx.stop()


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, databases: Databases
) -> Iterator[tuple[list[ServerProcess], NginxProcess, Stubs]]:
    """Shared by the tests that leave every replica running."""
    directory = tmp_path_factory.mktemp("nginx")
    with behind_nginx(directory, for_store_under_test(directory, databases)) as started:
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


def test_a_replica_down_is_skipped(tmp_path: Path, databases: Databases) -> None:
    with behind_nginx(tmp_path, for_store_under_test(tmp_path, databases)) as (servers, nginx, through):
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
    """Listen through nginx. With a database per replica (SQLite) only one of them knows the
    run: the others answer NOT_FOUND, and nginx's round robin reaches the right one within three
    calls. On one shared database the first call is answered."""
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


# ---- one shared database (PostgreSQL): any replica answers any call -----------------------------


def land_on(through: Stubs, servers: list[ServerProcess], target: int) -> None:
    """Make calls through nginx until one is answered by servers[target]: nginx's round robin
    then sends the next call to another replica. Each call is awaited in the logs, so the
    replica that answered is known, not assumed."""
    assistant = through.assistant(name="steering")
    for _ in range(3 * len(servers)):
        before = [calls(server, GET_ASSISTANT) for server in servers]
        through.assistants.Get(assistant_pb2.GetAssistantRequest(assistant_id=assistant.id), timeout=10)
        after = calls_per_replica(servers, GET_ASSISTANT, sum(before) + 1)
        if after[target] > before[target]:
            return
    raise AssertionError(f"nginx never sent a call to replica {target}")


def submit(stubs: Stubs, run_id: str, call_id: str) -> None:
    stubs.runs.SubmitToolResults(
        run_pb2.SubmitToolResultsRequest(
            run_id=run_id, tool_results=[common_pb2.ToolResult(tool_call_id=call_id, output="42")]
        ),
        timeout=10,
    )


def assert_whole_log(received: list[run_pb2.StreamEvent], stored: list[run_pb2.StreamEvent]) -> None:
    """Every index once, in order, ending with DONE: byte for byte what the database holds."""
    assert [e.index for e in received] == list(range(len(received)))
    assert received[-1].type == EventType.DONE
    assert [e.SerializeToString() for e in received] == [e.SerializeToString() for e in stored]


@shared_only
def test_one_runs_calls_are_answered_by_different_replicas(
    through: Stubs, servers: list[ServerProcess]
) -> None:
    """Made through nginx; listened to on one replica, its tool results submitted on another,
    and read with Get on each of the three."""
    assistant = through.tool_assistant("lookup")
    thread = through.thread("/tool lookup {}")
    land_on(through, servers, 0)
    run = through.run(assistant.id, thread.id)  # replica 1 takes it
    before_listen = served_counts(servers, LISTEN, run.id)
    before_submit = served_counts(servers, SUBMIT, run.id)
    history = History()
    received = history.listener(run.id).events
    for event in through.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60):  # replica 2
        received.append(event)
        if event.type == EventType.TOOL_CALLS:
            submit(through, run.id, event.tool_calls.tool_calls[0].id)  # round robin: not replica 2
    listened_on = who_served(servers, LISTEN, run.id, before_listen)  # before events() listens too
    submitted_on = who_served(servers, SUBMIT, run.id, before_submit)
    assert listened_on != submitted_on
    assert_whole_log(received, through.events(run.id))
    assert EventType.TOOL_CALLS in [e.type for e in received]
    assert_invariants(through, [run.id], history)

    # Every object, read through nginx on each replica in turn (round robin: three calls in a
    # row go to the three), is the same.
    before_get = served_counts(servers, GET_RUN, run.id)
    for _ in servers:
        got = through.runs.Get(run_pb2.GetRunRequest(run_id=run.id), timeout=10)
        assert got.status == run_pb2.COMPLETED and got.id == run.id
    for _ in servers:
        assert through.threads.Get(thread_pb2.GetThreadRequest(thread_id=thread.id), timeout=10) == thread
    for _ in servers:
        same = through.assistants.Get(
            assistant_pb2.GetAssistantRequest(assistant_id=assistant.id), timeout=10
        )
        assert same == assistant
    per_replica = [0] * len(servers)
    for _ in range(1000):  # the log lines come through pipes: wait for all three (bounded)
        now = served_counts(servers, GET_RUN, run.id)
        per_replica = [after - then for after, then in zip(now, before_get, strict=True)]
        if sum(per_replica) >= len(servers):
            break
        time.sleep(0.02)
    assert per_replica == [1, 1, 1]


@shared_only
def test_listen_through_nginx_follows_a_run_executing_on_another_replica(
    tmp_path: Path, new_database: Callable[..., TestDatabase]
) -> None:
    """The replica that claims the run is held before it writes anything past the queued event;
    the Listen is steered to another one, opened, and only then is the run let go: every later
    event reaches the stream through the database (NOTIFY hint, then a read), none missing."""
    holds = [Holds(tmp_path / f"holds{index}") for index in range(3)]
    point = "engine.before_run_body"
    database = shared(new_database())
    env = lambda index: holds[index].env(point)  # noqa: E731
    with behind_nginx(tmp_path / "r", database, env) as (servers, _nginx, through):
        assistant = through.assistant(name="echo")
        run = through.run(assistant.id, through.thread("hello from far away").id)
        executing = wait_held(holds, point)
        land_on(through, servers, executing)
        before = served_counts(servers, LISTEN, run.id)
        stream = through.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
        history = History()
        received = history.listener(run.id).events
        received.append(next(stream))  # the stream is open on its replica
        holds[executing].release(point)
        received.extend(stream)
        assert who_served(servers, LISTEN, run.id, before) != executing
        assert_whole_log(received, through.events(run.id))
        assert_invariants(through, [run.id], history)
        assert not any(hold.is_reached(point, 2) for hold in holds)  # executed once, by one


def wait_held(holds: list[Holds], point: str, timeout: float = 60.0) -> int:
    """The index of the replica held at ``point`` (the one that claimed the run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for index, hold in enumerate(holds):
            if hold.is_reached(point):
                return index
        time.sleep(0.01)
    raise AssertionError(f"no replica reached {point}")
