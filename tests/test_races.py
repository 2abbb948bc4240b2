"""Races between cancel, submit, completion and concurrent creates: exactly one outcome wins."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from spindle.v1 import common_pb2, message_pb2, run_pb2
from support.stubs import TERMINAL, Stubs

EventType = run_pb2.StreamEvent


def terminal_events(events: list[run_pb2.StreamEvent]) -> list[int]:
    return [
        e.index
        for e in events
        if e.type in (EventType.DONE, EventType.ERROR)
        or (e.type == EventType.STATUS and e.status in TERMINAL)
    ]


def test_cancel_races_completion(stubs: Stubs) -> None:
    rng = random.Random(7)
    assistant = stubs.assistant(name="racer")
    threads = [stubs.thread(f"/sleep 0.02 reply number {i} " + "w " * 5) for i in range(40)]
    delays = [rng.random() * 0.04 for _ in threads]
    outcomes: dict[str, run_pb2.Run] = {}
    runs: list[run_pb2.Run] = []

    def create_then_cancel(index: int) -> None:
        run = stubs.run(assistant.id, threads[index].id)
        runs.append(run)
        time.sleep(delays[index])  # lands before, during or after the 20 ms reply
        outcomes[run.id] = stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id), timeout=10)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create_then_cancel, range(len(threads))))
    seen = set()
    for run in runs:
        final = stubs.wait(run.id)
        seen.add(final.status)
        assert final.status in (run_pb2.COMPLETED, run_pb2.CANCELLED)
        assert outcomes[run.id].status in (run_pb2.COMPLETED, run_pb2.CANCELLED, run_pb2.CANCELLING)
        if outcomes[run.id].status == run_pb2.COMPLETED:
            assert final.status == run_pb2.COMPLETED  # cancelling a finished run changes nothing
        events = stubs.events(run.id)
        assert [e.index for e in events] == list(range(len(events)))
        assert terminal_events(events) == [len(events) - 1]
        replies = [
            m
            for m in stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=run.thread_id)).messages
            if m.role == message_pb2.ASSISTANT
        ]
        assert len(replies) == (1 if final.status == run_pb2.COMPLETED else 0)
    assert seen == {run_pb2.CANCELLED, run_pb2.COMPLETED}  # both sides of the race were run


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
