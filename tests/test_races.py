"""Races between cancel, submit, completion and concurrent creates: exactly one outcome wins."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from spindle.v1 import common_pb2, message_pb2, run_pb2
from support.faults import Holds
from support.invariants import History, assert_invariants
from support.server import ServerProcess
from support.stubs import TERMINAL, Stubs

MakeServer = Callable[..., ServerProcess]

EventType = run_pb2.StreamEvent


def terminal_events(events: list[run_pb2.StreamEvent]) -> list[int]:
    return [
        e.index
        for e in events
        if e.type in (EventType.DONE, EventType.ERROR)
        or (e.type == EventType.STATUS and e.status in TERMINAL)
    ]


def _replies(stubs: Stubs, run: run_pb2.Run) -> list[message_pb2.Message]:
    listed = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=run.thread_id), timeout=10)
    return [m for m in listed.messages if m.role == message_pb2.ASSISTANT]


def _race_server(make_server: MakeServer, holds: Holds, point: str) -> Stubs:
    return Stubs.connect(make_server(env=holds.env(point)).address)


def test_cancel_wins_when_it_lands_before_the_completion_write(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """The whole reply has streamed and the executor is about to write COMPLETED: a Cancel now
    ends the run CANCELLED, the completion is never written, and no reply joins the thread."""
    holds = Holds(tmp_path / "holds")
    stubs = _race_server(make_server, holds, "engine.before_turn_end_write")
    try:
        history = History()
        run = stubs.start("the whole reply streams first")
        holds.wait_reached("engine.before_turn_end_write")
        answer = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
        assert answer.status == run_pb2.CANCELLING  # the executor was still on it
        holds.release("engine.before_turn_end_write")  # would let the write go, were it not stopped
        final = stubs.wait(run.id)
        assert final.status == run_pb2.CANCELLED
        assert _replies(stubs, final) == []
        events = stubs.events(run.id)
        assert terminal_events(events) == [len(events) - 1]
        assert not [e for e in events if e.type == EventType.DONE]
        assert_invariants(stubs, [run.id], history)
    finally:
        stubs.close()


def test_completion_wins_when_it_commits_before_the_cancel(make_server: MakeServer, tmp_path: Path) -> None:
    """COMPLETED has committed but the executor's task is still alive: a Cancel now changes
    nothing, answers the completed run, and the reply stays."""
    holds = Holds(tmp_path / "holds")
    stubs = _race_server(make_server, holds, "engine.after_turn_end_write")
    try:
        history = History()
        run = stubs.start("done before the cancel")
        holds.wait_reached("engine.after_turn_end_write")
        answer = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)
        assert answer.status == run_pb2.COMPLETED
        holds.release("engine.after_turn_end_write")
        final = stubs.wait(run.id)
        assert final.status == run_pb2.COMPLETED
        assert len(_replies(stubs, final)) == 1
        assert_invariants(stubs, [run.id], history)
    finally:
        stubs.close()


def _tool_run(stubs: Stubs) -> tuple[run_pb2.Run, list[common_pb2.ToolResult]]:
    assistant = stubs.tool_assistant("f")
    run = stubs.run(assistant.id, stubs.thread("/tool f {}").id)
    paused = stubs.wait(run.id)
    assert paused.status == run_pb2.TOOL_CALLS
    return paused, [common_pb2.ToolResult(tool_call_id=c.id, output="ok") for c in paused.required_tool_calls]


def test_concurrent_identical_submits_resume_once(stubs: Stubs) -> None:
    run, results = _tool_run(stubs)
    barrier = threading.Barrier(8)
    codes: list[grpc.StatusCode] = []

    def submit(_: int) -> None:
        barrier.wait()
        try:
            stubs.runs.SubmitToolResults(
                run_pb2.SubmitToolResultsRequest(run_id=run.id, tool_results=results)
            )
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(submit, range(8)))
    assert codes.count(grpc.StatusCode.OK) >= 1
    # A loser that read TOOL_CALLS just before the winner committed may see the changed run.
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}
    assert stubs.wait(run.id).status == run_pb2.COMPLETED
    events = stubs.events(run.id)
    resumed = [e for e in events if e.status_change.reason == "tool results submitted"]
    assert len(resumed) == 1
    assert terminal_events(events) == [len(events) - 1]


def test_submit_races_cancel(stubs: Stubs) -> None:
    for _ in range(5):
        run, results = _tool_run(stubs)
        barrier = threading.Barrier(2)
        codes: list[grpc.StatusCode] = []
        request = run_pb2.SubmitToolResultsRequest(run_id=run.id, tool_results=results)

        def submit(
            request: run_pb2.SubmitToolResultsRequest,
            barrier: threading.Barrier,
            codes: list[grpc.StatusCode],
        ) -> None:
            barrier.wait()
            try:
                stubs.runs.SubmitToolResults(request)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())

        def cancel(run_id: str, barrier: threading.Barrier) -> None:
            barrier.wait()
            stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run_id))

        threads = [
            threading.Thread(target=submit, args=(request, barrier, codes)),
            threading.Thread(target=cancel, args=(run.id, barrier)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert codes in ([grpc.StatusCode.OK], [grpc.StatusCode.FAILED_PRECONDITION])
        final = stubs.wait(run.id)
        assert final.status in (run_pb2.CANCELLED, run_pb2.COMPLETED)
        if codes == [grpc.StatusCode.FAILED_PRECONDITION]:
            assert final.status == run_pb2.CANCELLED  # cancel won: the results were refused
        events = stubs.events(run.id)
        assert terminal_events(events) == [len(events) - 1]


def test_concurrent_creates_on_one_thread_start_one_run(stubs: Stubs) -> None:
    assistant = stubs.assistant(name="one")
    thread = stubs.thread("/sleep 1 hello")
    barrier = threading.Barrier(8)
    created: list[str] = []
    refused: list[grpc.StatusCode] = []

    def create(_: int) -> None:
        barrier.wait()
        try:
            created.append(stubs.run(assistant.id, thread.id).id)
        except grpc.RpcError as error:
            refused.append(error.code())

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, range(8)))
    assert len(created) == 1
    assert refused == [grpc.StatusCode.FAILED_PRECONDITION] * 7
    stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=created[0]))


def test_same_request_id_concurrently_creates_one_run(stubs: Stubs) -> None:
    assistant = stubs.assistant(name="idem")
    thread = stubs.thread("hello once")
    barrier = threading.Barrier(6)
    ids: list[str] = []

    def create(_: int) -> None:
        barrier.wait()
        ids.append(stubs.run(assistant.id, thread.id, request_id="create-once-1").id)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(create, range(6)))
    assert len(set(ids)) == 1
    assert stubs.wait(ids[0]).status == run_pb2.COMPLETED
    assert len(stubs.runs.List(run_pb2.ListRunsRequest(thread_id=thread.id)).runs) == 1
