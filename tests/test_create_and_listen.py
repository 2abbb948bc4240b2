"""RunService.CreateAndListen: a run created and streamed in one call.

The stream is the run's stored log from index 0 (its first event the STATUS carrying the run);
an error before the run exists is Create's own (status and ErrorInfo reason), with no message and
no run made; a retry with the same request_id streams the same run; a client that goes away
mid-run leaves the run to finish. On both stores (SPINDLE_TEST_STORE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from spindle.v1 import run_pb2
from spindle_server import ids
from support.faults import Holds
from support.invariants import History, assert_invariants
from support.server import Databases, ServerProcess
from support.stubs import Stubs, error_details

MakeServer = Callable[..., ServerProcess]
PROJECTS = ("main", "quota", "streams")
SLOW = "/sleep 60\na run that streams for a minute, until it is cancelled"
TURN_END = "engine.before_turn_end_write"  # held: the run cannot finish until released


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, databases: Databases) -> Iterator[ServerProcess]:
    """Two active runs and one Listen stream at a time per project."""
    keys = [arg for project in PROJECTS for arg in ("--api-key", f"key-{project}={project}")]
    flags = [*keys, "--max-active-runs-per-project", "2", "--max-listen-streams-per-project", "1"]
    process = ServerProcess(databases.new(tmp_path_factory.mktemp("create-listen")), flags).start()
    yield process
    process.stop()


@pytest.fixture
def api(limited: ServerProcess) -> Iterator[Callable[[str], Stubs]]:
    opened: list[Stubs] = []

    def connect(project: str) -> Stubs:
        opened.append(Stubs.connect(limited.address, api_key=f"key-{project}"))
        return opened[-1]

    yield connect
    for stubs in opened:
        stubs.close()


def create_and_listen(stubs: Stubs, request: run_pb2.CreateRunRequest) -> list[run_pb2.StreamEvent]:
    return [e for batch in stubs.runs.CreateAndListen(request, timeout=60) for e in batch.events]


def runs_of(stubs: Stubs, thread_id: str) -> list[str]:
    listed = stubs.runs.List(run_pb2.ListRunsRequest(thread_id=thread_id), timeout=10)
    return [run.id for run in listed.runs]


def test_the_stream_is_the_runs_log_from_index_0(api: Callable[[str], Stubs]) -> None:
    stubs = api("main")
    assistant = stubs.assistant(name="echo")
    thread = stubs.thread("hello, in one call")
    history = History()
    events = create_and_listen(
        stubs, run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id)
    )
    first = events[0]
    # The client learns its run from the stream: event 0 is the STATUS of the run as created.
    assert first.index == 0 and first.type == run_pb2.StreamEvent.STATUS
    run = first.status_change.run
    assert run.id == first.run_id and run.thread_id == thread.id and run.status == run_pb2.PENDING
    history.listener(run.id).events.extend(events)
    assert events[-1].type == run_pb2.StreamEvent.DONE
    assert events[-1].done.message.content[0].text.text == "You said: hello, in one call"
    # The same events as the stored log, through Listen and through ListenBatches.
    assert events == stubs.events(run.id)
    replay = stubs.runs.ListenBatches(run_pb2.ListenRunRequest(run_id=run.id), timeout=30)
    assert events == [e for batch in replay for e in batch.events]
    assert runs_of(stubs, thread.id) == [run.id]
    assert_invariants(stubs, [run.id], history)


def test_errors_before_the_run_are_creates_and_make_no_run(api: Callable[[str], Stubs]) -> None:
    stubs, quota = api("main"), api("quota")
    assistant, busy = stubs.assistant(name="echo"), quota.assistant(name="echo")
    thread, other = stubs.thread("hi"), quota.thread("another thread of a project at its limit")
    used = stubs.run(assistant.id, stubs.thread("used").id, request_id="rid-used")
    assert stubs.wait(used.id).status == run_pb2.COMPLETED
    active = stubs.start(SLOW, assistant)  # its thread has an active run
    at_limit = [quota.start(SLOW, busy) for _ in range(2)]  # the quota project's active runs
    cases = [
        (stubs, dict(assistant_id="not-an-id", thread_id=thread.id), "INVALID_ARGUMENT"),
        (stubs, dict(assistant_id=assistant.id, thread_id=thread.id, temperature=9.0), "INVALID_ARGUMENT"),
        (stubs, dict(assistant_id=assistant.id, thread_id=ids.new_id("thread")), "NOT_FOUND"),
        (stubs, dict(assistant_id=ids.new_id("asst"), thread_id=thread.id), "NOT_FOUND"),
        (stubs, dict(assistant_id=assistant.id, thread_id=active.thread_id), "FAILED_PRECONDITION"),
        (quota, dict(assistant_id=busy.id, thread_id=other.id), "RESOURCE_EXHAUSTED"),
        (
            stubs,
            dict(assistant_id=assistant.id, thread_id=thread.id, request_id="rid-used"),
            "INVALID_ARGUMENT",
        ),
    ]
    for client, fields, code in cases:
        request = run_pb2.CreateRunRequest(**fields)  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as created:
            client.runs.Create(request, timeout=10)
        received: list[run_pb2.StreamEventBatch] = []
        with pytest.raises(grpc.RpcError) as streamed:
            received.extend(client.runs.CreateAndListen(request, timeout=10))
        assert received == [], fields  # no message before the error
        assert streamed.value.code() == created.value.code() == getattr(grpc.StatusCode, code), fields
        reason, expected = error_details(streamed.value)[0], error_details(created.value)[0]
        assert reason is not None and expected is not None and reason.reason == expected.reason, fields
    # No run was made by any of them.
    assert runs_of(stubs, thread.id) == [] and runs_of(quota, other.id) == []
    assert runs_of(stubs, active.thread_id) == [active.id]
    assert runs_of(stubs, used.thread_id) == [used.id]
    for client, run in ((stubs, active), *((quota, run) for run in at_limit)):
        client.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
    assert_invariants(stubs, [active.id, used.id])
    assert_invariants(quota, [run.id for run in at_limit])


def test_no_room_for_another_stream_is_refused_before_the_run_is_made(api: Callable[[str], Stubs]) -> None:
    stubs = api("streams")
    assistant = stubs.assistant(name="echo")
    run = stubs.start(SLOW, assistant)
    listening = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
    assert next(listening).index == 0  # the project's one stream is open
    thread = stubs.thread("no room")
    with pytest.raises(grpc.RpcError) as refused:
        create_and_listen(stubs, run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id))
    info = error_details(refused.value)[0]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info is not None and info.reason == "LISTEN_STREAMS_LIMIT"
    assert runs_of(stubs, thread.id) == []
    listening.cancel()
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
    assert_invariants(stubs, [run.id])


def test_a_retry_with_the_same_request_id_streams_the_same_run(api: Callable[[str], Stubs]) -> None:
    stubs = api("main")
    assistant = stubs.assistant(name="echo")
    thread = stubs.thread("once only")
    request = run_pb2.CreateRunRequest(
        assistant_id=assistant.id, thread_id=thread.id, request_id="rid-stream"
    )
    first = create_and_listen(stubs, request)
    again = create_and_listen(stubs, request)
    assert again == first and first[-1].type == run_pb2.StreamEvent.DONE
    run_id = first[0].run_id
    # Create answers the same request_id with the same run too: one idempotency for both calls.
    assert stubs.runs.Create(request, timeout=10).id == run_id
    assert runs_of(stubs, thread.id) == [run_id]
    assert_invariants(stubs, [run_id])


def test_a_client_gone_mid_run_leaves_the_run_to_finish(make_server: MakeServer, tmp_path: Path) -> None:
    holds = Holds(tmp_path / "holds")
    server = make_server("--coalesce-ms", "0", env=holds.env(TURN_END))
    stubs = Stubs.connect(server.address)
    assistant = stubs.assistant(name="echo")
    thread = stubs.thread("finish without me")
    history = History()
    stream = stubs.runs.CreateAndListen(
        run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id), timeout=60
    )
    received: list[run_pb2.StreamEvent] = []
    for batch in stream:
        received.extend(batch.events)
        if any(e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE for e in received):
            break
    run_id = received[0].run_id
    history.listener(run_id).events.extend(received)
    holds.wait_reached(TURN_END)  # the run is held before its end: it cannot have finished yet
    stream.cancel()
    assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=run_id), timeout=10).status == run_pb2.IN_PROGRESS
    holds.release(TURN_END)
    finished = stubs.wait(run_id)
    assert finished.status == run_pb2.COMPLETED
    assert finished.reply.content[0].text.text == "You said: finish without me"
    assert_invariants(stubs, [run_id], history)
    stubs.close()


def test_reflection_describes_the_method(limited: ServerProcess) -> None:
    """grpcurl finds it (the README's walkthrough calls it): the server's reflection describes
    RunService with CreateAndListen, a server stream of StreamEventBatch for a CreateRunRequest."""
    with grpc.insecure_channel(limited.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = reflection_pb2.ServerReflectionRequest(file_containing_symbol="spindle.v1.RunService")
        (answer,) = stub.ServerReflectionInfo(iter([asked]), timeout=10)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]
    (service,) = [s for f in files for s in f.service if s.name == "RunService"]
    (method,) = [m for m in service.method if m.name == "CreateAndListen"]
    assert method.server_streaming and not method.client_streaming
    assert (method.input_type, method.output_type) == (
        ".spindle.v1.CreateRunRequest",
        ".spindle.v1.StreamEventBatch",
    )
